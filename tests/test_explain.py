"""`lens explain`: per-token explanations of a text by a saved lens, their scores and salience, the terminal table,
and the HTML page (checked as parsed HTML and as rendered by headless Chromium)."""

from __future__ import annotations

import colorsys
import math
import re
import shutil
import struct
import subprocess
import zlib
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from lens import losses
from lens.cli import main
from lens.errors import InputError
from lens.evaluate import lens_predictions
from lens.explain import TextExplanation, TokenExplanation, explain
from lens.html_report import render
from lens.inference import load_lens
from lens.objective import Batch

TEXT = 'Paris is the capital of <b>&"France".'  # 23 tokens of the tiny tokenizer: 18 explained, 8 past seq_len


@pytest.fixture(scope="module")
def lens(trained_run):
    return load_lens(str(trained_run))


@pytest.fixture(scope="module")
def report(lens) -> TextExplanation:
    return explain(lens, TEXT)


@pytest.fixture(scope="module")
def report4(lens) -> TextExplanation:
    return explain(lens, TEXT, best_of=4)


def test_one_record_per_explainable_token(lens, report):
    tokenizer, cfg = lens.model.tokenizer, lens.cfg
    ids = [tokenizer.bos_token_id] + tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert report.tokens == [tokenizer.decode([i]) for i in ids]
    assert report.first_explained == 1 + cfg.data.min_pos  # BOS, then min_pos tokens training never explains
    assert [r.position for r in report.records] == list(range(report.first_explained, len(ids)))
    assert (report.checkpoint, report.step, report.layer) == (str(lens.checkpoint.uri), 6, cfg.model.layer)
    for r in report.records:
        assert r.token == report.tokens[r.position]
        assert len(r.explanation_ids) == len(r.explanation_tokens) == cfg.decoder.t_text
        assert r.explanation == tokenizer.decode(r.explanation_ids)
        assert r.explanation_tokens == [tokenizer.decode([i]) for i in r.explanation_ids]
        assert math.isfinite(r.nmse) and r.nmse >= 0 and r.recovered == pytest.approx(1 - r.nmse)
        assert math.isfinite(r.kl) and r.kl >= 0
        assert r.member == 0
        assert r.beyond_training_context == (r.position >= cfg.data.seq_len)
    assert any(r.beyond_training_context for r in report.records)
    assert len({r.explanation for r in report.records}) > 1


def test_k1_is_the_training_forward_keyed_by_position(lens, report):
    """K=1 is what `lens eval` computes for a sample whose id is the token's position."""
    model = lens.model
    ctx = torch.tensor([model.tokenizer.bos_token_id] + model.tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    positions = torch.tensor([r.position for r in report.records])
    ids = ctx.expand(len(positions), -1)
    A = model.orig.capture(ids, model.layer, positions)
    A_hat, expl_ids, _ = lens_predictions(model, Batch(ids, positions, A, positions), lens.cfg.train.micro_batch_size)
    assert expl_ids.tolist() == [r.explanation_ids for r in report.records]
    assert losses.normalized_mse(A, A_hat).tolist() == pytest.approx([r.nmse for r in report.records], rel=1e-5)


def test_best_of_k_never_worse_and_reproducible(lens, report, report4):
    assert [r.position for r in report4.records] == [r.position for r in report.records]
    for one, best in zip(report.records, report4.records):
        assert best.nmse <= one.nmse, one.position  # K=1's explanation is candidate 0 of the K
        assert 0 <= best.member < 4
        if best.member == 0:
            assert best.explanation_ids == one.explanation_ids
    assert any(best.nmse < one.nmse for one, best in zip(report.records, report4.records))
    assert explain(lens, TEXT) == report  # same input, same output (randomness is keyed, not drawn)


def test_salience_is_the_nmse_rise_of_blanking_each_token(lens, report):
    model, t_text = lens.model, lens.cfg.decoder.t_text
    assert all(len(r.salience) == t_text for r in report.records)
    assert any(abs(s) > 1e-4 for r in report.records for s in r.salience)
    r = report.records[0]  # recompute one record's salience by hand: zero each token's embedding, re-encode
    ctx_ids = model.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    current = torch.tensor([ctx_ids[r.position - 1]])
    embeds = model.encoder.parts.embed_ids(torch.tensor([r.explanation_ids])).float()
    A = model.orig.capture(torch.tensor([[model.tokenizer.bos_token_id] + ctx_ids]), model.layer,
                           torch.tensor([r.position]))
    with torch.no_grad():
        base = losses.normalized_mse(A, model.encoder(embeds, current))
        assert float(base) == pytest.approx(r.nmse, abs=1e-5)
        for t in range(t_text):
            blanked = embeds.clone()
            blanked[0, t] = 0
            rise = float(losses.normalized_mse(A, model.encoder(blanked, current)) - base)
            assert rise == pytest.approx(r.salience[t], abs=1e-5)


@pytest.mark.parametrize("text, best_of, names", [
    ("", 1, "text: empty"),
    ("   \n", 1, "text: empty"),
    ("The", 1, "too short"),
    ("The dog " * 200, 1, "too long"),
    (TEXT, 0, "--best-of: 0"),
])
def test_bad_requests_are_input_errors(lens, text, best_of, names):
    with pytest.raises(InputError, match=re.escape(names)):
        explain(lens, text, best_of)


def test_cli_prints_the_table_and_writes_the_page(trained_run, tmp_path, capsys, report):
    page = tmp_path / "report.html"
    assert main(["explain", str(trained_run), TEXT, "--html", str(page)]) == 0
    out = capsys.readouterr().out
    assert f"(step {report.step})" in out and "best of 1" in out and "not explained" in out
    rows = [line for line in out.splitlines() if re.match(r"\s*\d+\*?\s", line)]
    assert len(rows) == len(report.records)
    for row, r in zip(rows, report.records):
        assert row.split()[0].rstrip("*") == str(r.position)
        assert f"{r.nmse:.3f}" in row and f"{r.kl:.4f}" in row and repr(r.explanation) in row
        assert " ".join(f"{s:+.3f}" for s in r.salience) in row
    assert f"wrote {page}" in out
    assert page.read_text(encoding="utf-8") == render(report)


@pytest.mark.parametrize("args, message", [
    (["--best-of", "0"], "--best-of: 0 is invalid"),
    (["--best-of", "-3"], "--best-of: -3 is invalid"),
])
def test_cli_rejects_bad_best_of(trained_run, capsys, args, message):
    assert main(["explain", str(trained_run), TEXT, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lens explain: ") and message in err and len(err.strip().splitlines()) == 1


def test_cli_rejects_empty_text(trained_run, capsys):
    assert main(["explain", str(trained_run), ""]) == 2
    assert "lens explain: text: empty" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ HTML


class _Page(HTMLParser):
    """Start tags with their attributes and the text content (entities decoded), as a browser would parse them."""

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _hand_made(token: str, explanation_tokens: list[str]) -> TextExplanation:
    record = TokenExplanation(position=1, token=token, explanation="".join(explanation_tokens),
                              explanation_ids=[5, 6, 7], explanation_tokens=explanation_tokens, nmse=0.25,
                              recovered=0.75, kl=0.125, salience=[0.5, -0.25, 0.0], member=0,
                              beyond_training_context=False)
    return TextExplanation(checkpoint='s3://b/run "x" <y>', step=3, model="m&<m>", layer=2, best_of=1,
                           tokens=["<s>", token], first_explained=1, train_seq_len=16, records=[record])


def test_page_escapes_every_text():
    nasty = '<b>&"x\'</b>'
    parsed = _Page(render(_hand_made(nasty, ["<i>", "&amp;", '"q"'])))
    plain = _Page(render(_hand_made("x", ["a", "b", "c"])))
    assert [tag for tag, _ in parsed.tags] == [tag for tag, _ in plain.tags]  # no markup leaked from the data
    text = "".join(parsed.text)
    assert nasty in text and "&amp;" in text and '"q"' in text and 's3://b/run "x" <y>' in text and "m&<m>" in text
    tips = [a["data-tip"] for tag, a in parsed.tags if "data-tip" in a]
    assert any(tip.startswith('<i>&amp;"q"\nnMSE 0.250') for tip in tips)


def test_page_is_self_contained(report):
    parsed = _Page(render(report))
    assert [tag for tag, _ in parsed.tags].count("script") == 1
    for tag, attrs in parsed.tags:
        assert tag not in ("link", "iframe", "img", "object", "embed"), tag
        for name in ("src", "href", "action", "srcset"):
            assert name not in attrs, (tag, attrs)
    page = render(report)
    assert "@import" not in page and "url(" not in page and "http://" not in page and "https://" not in page


# ------------------------------------------------------------------------------------------------ browser


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium)")


def _browse(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    profile.mkdir()
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--force-color-profile=srgb", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=True)


def _png(path: Path) -> tuple[int, int, list[bytes], int]:
    """(width, height, unfiltered rows, bytes per pixel) of an 8-bit RGB/RGBA non-interlaced PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    bpp = 3 if colour == 2 else 4
    raw, stride, rows, prev = zlib.decompress(idat), width * bpp, [], bytes(width * bpp)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride) if kind else ():
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            else:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = rows[-1]
    return width, height, rows, bpp


def _hsl_rgb(css: str) -> tuple[int, ...]:
    h, s, l = (float(v) for v in re.fullmatch(r"hsl\((\d+) (\d+)% (\d+)%\)", css).groups())
    return tuple(round(255 * v) for v in colorsys.hls_to_rgb(h / 360, l / 100, s / 100))


def test_browser_renders_the_page(report4, tmp_path):
    from lens.html_report import recovered_colour

    page = tmp_path / "report.html"
    page.write_text(render(report4), encoding="utf-8")
    pinned = report4.records[3]
    url = f"{page.as_uri()}#pos-{pinned.position}"

    dom = _browse(tmp_path, "--dump-dom", url).stdout
    parsed = _Page(dom)
    text = "".join(parsed.text)
    for token in report4.tokens:
        assert token in text
    for r in report4.records:
        assert r.explanation in text and f"{r.nmse:.3f}" in text and f"{r.kl:.4f}" in text
    cards = {a["id"]: a for tag, a in parsed.tags if a.get("class") == "card"}
    assert len(cards) == len(report4.records)
    assert [i for i, a in cards.items() if "hidden" not in a] == [f"card-{pinned.position}"]  # the script pinned it
    assert any("pinned" in a.get("class", "") and a.get("data-i") == str(pinned.position) for _, a in parsed.tags)

    shot = tmp_path / "shot.png"
    _browse(tmp_path, f"--screenshot={shot}", "--window-size=1200,900", url)
    width, height, rows, bpp = _png(shot)
    assert (width, height) == (1200, 900)
    colours = {row[i:i + 3] for row in rows[::3] for i in range(0, len(row), 3 * bpp)}
    assert len(colours) > 50  # text, legend gradient, token colours: not a blank page
    want = bytes(_hsl_rgb(recovered_colour(report4.records[0].recovered)))
    assert any(all(abs(a - b) <= 3 for a, b in zip(c, want)) for c in colours), "token colours are not drawn"


def test_page_marks_tokens_past_the_training_context(report):
    record = next(r for r in report.records if r.beyond_training_context)
    page = render(replace(report, records=[record]))
    spans = [a for tag, a in _Page(page).tags if a.get("data-i") == str(record.position) and tag == "span"]
    assert spans and "beyond" in spans[0]["class"]
