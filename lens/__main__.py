from lens.cli import run

run()
