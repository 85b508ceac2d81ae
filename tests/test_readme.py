"""The README cannot drift from the code: every command in its code blocks names a script
that exists and only flags that script's -h lists."""
import os
import re
import shlex
import subprocess
import sys
from functools import lru_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands():
    """(line, script, sub-command or None, [flags]) for each python/torchrun line in a code block."""
    text = open(os.path.join(ROOT, "README.md")).read()
    text = text.replace("\\\n", " ")  # join continued lines
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split("#")[0].strip()
            for part in re.split(r"&&|;|\|", line):
                words = shlex.split(part)
                scripts = [w for w in words if w.endswith(".py")]
                if not scripts or words[0] not in ("python", "torchrun"):
                    continue
                script = scripts[0]
                rest = words[words.index(script) + 1:]
                sub = rest[0] if script == "latent_edit.py" and rest and not rest[0].startswith("-") else None
                flags = [w.split("=")[0] for w in rest if w.startswith("--")]
                found.append((part.strip(), script, sub, flags))
    return found


@lru_cache(maxsize=None)
def help_text(script, sub):
    cmd = [sys.executable, script] + ([sub] if sub else []) + ["-h"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{' '.join(cmd)} failed: {r.stderr[-500:]}"
    return r.stdout


def test_readme_has_commands_for_every_script():
    scripts = {s for _, s, _, _ in readme_commands()}
    for s in ["dcgan.py", "mlp_gan.py", "vae_conv.py", "mlp_vae.py", "vaegan.py", "metrics.py", "latent_edit.py"]:
        assert s in scripts, f"README shows no command for {s}"


def test_every_readme_command_uses_existing_scripts_and_flags():
    problems = []
    for line, script, sub, flags in readme_commands():
        if not os.path.exists(os.path.join(ROOT, script)):
            problems.append(f"{line}: no file {script}")
            continue
        text = help_text(script, sub)
        problems += [f"{line}: {script} {sub or ''} has no flag {f}" for f in flags
                     if not re.search(re.escape(f) + r"\b", text)]
    assert not problems, "\n".join(problems)


def test_readme_opens_with_the_two_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    first_block = re.search(r"```[a-z]*\n(.*?)```", text, flags=re.S).group(1)
    lines = [l for l in first_block.splitlines() if l.strip() and not l.startswith("#")]
    assert len(lines) == 2 and "pip install -r requirements.txt" in lines[0] and lines[1] == "python -m pytest"
