import sys

from lens.cli import main

sys.exit(main())
