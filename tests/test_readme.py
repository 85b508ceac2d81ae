"""The documentation cannot drift from the code: every python/torchrun command in a code block of README.md
and docs/*.md names a script that exists, only flags that its -h lists (the sub-command's for latent_edit.py),
and parses with the script's own argument parser (values of the right type, within the choices); commands in
inline code (`python ...`) are checked for their scripts and flags. Relative links and pictures point at files
that exist. CPU, no network; the help texts come from the scripts' own parsers in this process (no python
started per script), so the whole file takes a few seconds."""
import argparse
import contextlib
import glob
import importlib.util
import io
import os
import re
import shlex
from functools import lru_cache

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
MAIN_SCRIPTS = ["dcgan.py", "mlp_gan.py", "vae_conv.py", "mlp_vae.py", "vaegan.py", "metrics.py", "latent_edit.py"]
SUBCOMMANDS = {"latent_edit.py"}          # scripts whose first positional word is a sub-command
ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")  # VAR=value before a command


def read(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


def parse_command(text):
    """(script, sub-command or None, words after the script) of one shell command, or None when it does not
    run a .py file through python or torchrun."""
    try:
        words = shlex.split(text)
    except ValueError:                    # an unbalanced quote: not a command
        return None
    while words and ENV.match(words[0]):
        words = words[1:]
    if not words or words[0] not in ("python", "python3", "torchrun"):
        return None
    scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
    if not scripts:                       # python -m pytest, ...
        return None
    script, rest = words[scripts[0]], words[scripts[0] + 1:]
    sub = rest[0] if script in SUBCOMMANDS and rest and not rest[0].startswith("-") else None
    return script, sub, rest


def commands(page, inline=False):
    """(page, command text, script, sub, words after the script) of each python/torchrun command in the page's
    fenced code blocks (continued lines joined, comments dropped, && ; | split), or with inline=True in its
    inline code spans outside the blocks."""
    text = read(page)
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    found = []
    if inline:
        prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
        parts = [" ".join(span.split()) for span in re.findall(r"`((?:python|torchrun) [^`]+)`", prose)]
    else:
        parts = []
        for block in blocks:
            for line in block.replace("\\\n", " ").splitlines():
                parts += re.split(r"&&|;|\|", re.sub(r"(^|\s)#.*", "", line))
    for part in parts:
        parsed = parse_command(part.strip())
        if parsed:
            found.append((page, part.strip(), *parsed))
    return found


ALL_BLOCK_COMMANDS = [c for page in PAGES for c in commands(page)]
ALL_INLINE_COMMANDS = [c for page in PAGES for c in commands(page, inline=True)]


# ----------------------------------------------------------------------------- the scripts' own parsers

class _Grabbed(BaseException):  # not an Exception: no "except Exception" in a main() can swallow it
    pass


def load_module(script):
    """The script as a module, imported from its path (the model scripts, metrics.py and latent_edit.py import
    without side effects; benchmarks/*.py only add the repository to sys.path)."""
    name = "docs_check_" + re.sub(r"\W", "_", script[:-3])
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@lru_cache(maxsize=None)
def parser_of(script):
    """The argparse parser that script's main() builds: main() runs until its first parse_args call, which
    hands over the parser instead of parsing (nothing is read, built or written before that)."""
    module = load_module(script)

    def grab(self, *args, **kwargs):
        raise _Grabbed(self)
    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = grab
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            module.main()
    except _Grabbed as e:
        return e.args[0]
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f"{script}'s main() returned without parsing a command line")


def run_parser(script, words):
    """(exit status, stdout + stderr) of the script's parser on words, as `python script words` would
    give them up to its parsing (argparse exits on -h and on errors)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            parser_of(script).parse_args(words)
            code = 0
        except SystemExit as e:
            code = e.code or 0
    return code, out.getvalue()


@lru_cache(maxsize=None)
def flags_of(script, sub):
    """The option strings that `script [sub] -h` lists: its usage line and its options' first column."""
    code, text = run_parser(script, ([sub] if sub else []) + ["-h"])
    assert code == 0, f"{script} {sub or ''} -h failed: {text[-500:]}"
    usage = text.split("\n\n")[0]
    listed = "\n".join(re.findall(r"^\s{2}(-\S.*?)(?:\s{2,}|$)", text, flags=re.M))
    return frozenset(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", usage + "\n" + listed))


def problems_of(found, parse):
    problems = []
    for page, line, script, sub, rest in found:
        where = f"{page}: {line}\n   "
        if not os.path.isfile(os.path.join(ROOT, script)):
            problems.append(f"{where} no file {script}")
            continue
        if sub is not None:
            code, text = run_parser(script, [sub, "-h"])
            if code != 0:
                problems.append(f"{where} {script} has no sub-command {sub}: {text.strip().splitlines()[-1]}")
                continue
        known = flags_of(script, sub)
        missing = [w.split("=")[0] for w in rest if w.startswith("--") and w.split("=")[0] not in known]
        problems += [f"{where} {script}{' ' + sub if sub else ''} has no flag {f}" for f in missing]
        if parse and not missing:
            code, text = run_parser(script, rest)
            if code != 0:
                problems.append(f"{where} {script} refuses it: {text.strip().splitlines()[-1]}")
    return problems


# ----------------------------------------------------------------------------- the tests

def test_readme_has_commands_for_every_script():
    scripts = {c[2] for c in ALL_BLOCK_COMMANDS if c[0] == "README.md"}
    for s in MAIN_SCRIPTS:
        assert s in scripts, f"README.md shows no command for {s}"


def test_the_commands_of_the_docs_are_found():
    """The checks below see the docs' commands: in code blocks (bash, continued lines, after VAR=value) and
    in inline code."""
    assert len(PAGES) > 1, "no docs/*.md"
    pages = {c[0] for c in ALL_BLOCK_COMMANDS}
    assert "README.md" in pages and len(pages) > 1, pages
    assert any(c[0] != "README.md" for c in ALL_INLINE_COMMANDS)
    assert parse_command("DATA_ROOT=/d torchrun --nproc_per_node=2 dcgan.py --data mnist") == \
        ("dcgan.py", None, ["--data", "mnist"])
    assert parse_command("python latent_edit.py sample --ckpt c.pt")[:2] == ("latent_edit.py", "sample")
    assert parse_command("python -m pytest") is None


def test_every_command_in_a_code_block_uses_existing_scripts_and_flags_and_parses():
    problems = problems_of(ALL_BLOCK_COMMANDS, parse=True)
    assert not problems, "\n".join(problems)


def test_every_inline_command_uses_existing_scripts_and_flags():
    problems = problems_of(ALL_INLINE_COMMANDS, parse=False)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("flag", ["--truncation", "--d-filter", "--temperature", "--recon-samples"])
def test_a_removed_flag_would_be_found(flag):
    """The check itself: a model script's command with a sampling flag that moved to latent_edit.py sample
    fails, and the same flag on latent_edit.py sample passes (--recon-samples: nowhere)."""
    moved = problems_of([("scratch.md", "", "dcgan.py", None, ["--data", "mnist", flag, "1"])], parse=True)
    assert moved and f"has no flag {flag}" in moved[0]
    here = problems_of([("scratch.md", "", "latent_edit.py", "sample", ["sample", "--ckpt", "x.pt", flag, "1"])],
                       parse=True)
    assert bool(here) == (flag == "--recon-samples"), here


def test_readme_opens_with_the_two_commands():
    text = read("README.md")
    first_block = re.search(r"```[a-z]*\n(.*?)```", text, flags=re.S).group(1)
    lines = [l for l in first_block.splitlines() if l.strip() and not l.startswith("#")]
    assert len(lines) == 2 and "pip install -r requirements.txt" in lines[0] and lines[1] == "python -m pytest"


def test_readme_is_a_front_page():
    assert len(read("README.md").splitlines()) <= 400, "README.md is over 400 lines: move detail to docs/*.md"


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation other than - and _ dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_and_pictures_exist():
    problems = []
    for page in PAGES:
        text = re.sub(r"^```[^\n]*\n.*?^```", "", read(page), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path else \
                os.path.join(ROOT, page)
            if not os.path.exists(file):
                problems.append(f"{page}: {target}: no file {os.path.relpath(file, ROOT)}")
            elif anchor and file.endswith(".md"):
                with open(file, encoding="utf-8") as f:
                    headings = re.findall(r"^#+ (.*)$", f.read(), flags=re.M)
                if anchor not in {slug(h.replace("`", "")) for h in headings}:
                    problems.append(f"{page}: {target}: no heading with the anchor #{anchor}")
    assert not problems, "\n".join(problems)
