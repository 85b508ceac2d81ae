"""The shape of the code that makes each model script its paper (CONVENTIONS.md), kept from drifting: the
scripts' sizes, every function's, the imports a copied script may need, the training loop in each main(), no
training machinery copied between the scripts, and none of the shared modules running a backward pass."""
import ast
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LIMITS = {"dcgan.py": 400, "mlp_gan.py": 300, "vae_conv.py": 400, "mlp_vae.py": 300, "vaegan.py": 500,
          "latent_edit.py": 1000}
SCRIPTS = ["dcgan.py", "mlp_gan.py", "vae_conv.py", "mlp_vae.py", "vaegan.py"]
FILES = SCRIPTS + ["data.py", "metrics.py", "latent_edit.py"]


def tree(name):
    return ast.parse((REPO / name).read_text())


def functions(name):
    return [n for n in ast.walk(tree(name)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


@pytest.mark.parametrize("name", list(LIMITS))
def test_a_script_reads_in_one_sitting(name):
    assert len((REPO / name).read_text().splitlines()) <= LIMITS[name]


@pytest.mark.parametrize("name", FILES)
def test_no_line_over_120_characters_and_no_function_over_60_lines(name):
    lines = (REPO / name).read_text().splitlines()
    assert [i + 1 for i, line in enumerate(lines) if len(line) > 120] == []
    assert [(f.name, f.end_lineno - f.lineno + 1) for f in functions(name) if f.end_lineno - f.lineno + 1 > 60] == []


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_model_script_needs_only_data_py_and_metrics_py_beside_it(name):
    imported = {(n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
                for n in ast.walk(tree(name)) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in (n.names if isinstance(n, ast.Import) else [None])}
    assert imported - set(sys.stdlib_module_names) - {"torch", "torchvision"} == {"data", "metrics"}


@pytest.mark.parametrize("name", SCRIPTS)
def test_main_is_a_table_of_contents_that_holds_the_training_loop(name):
    main = next(f for f in functions(name) if f.name == "main")
    assert main.end_lineno - main.lineno + 1 <= 60
    loops = [n for n in ast.walk(main) if isinstance(n, ast.For) and "run.batches" in ast.unparse(n.iter)]
    assert loops, f"{name}'s main() has no `for ... in run.batches(loader)` loop"
    assert any(isinstance(c, ast.Call) and "train_step" in ast.unparse(c.func) for c in ast.walk(loops[0]))


@pytest.mark.parametrize("name", ["data.py", "metrics.py"])
def test_the_shared_modules_run_no_backward_pass(name):
    assert "backward(" not in (REPO / name).read_text()


def test_no_function_is_defined_alike_in_three_model_scripts():
    """Machinery belongs once in data.py or metrics.py: no function of more than 3 lines may be defined
    identically (the same code, docstring aside) in three or more model scripts."""
    seen = {}
    for name in SCRIPTS:
        for f in functions(name):
            body = f.body[1:] if f.body and isinstance(f.body[0], ast.Expr) and \
                isinstance(f.body[0].value, ast.Constant) else f.body
            if f.end_lineno - f.lineno + 1 > 3:
                key = (f.name, ast.dump(ast.Module(body=body, type_ignores=[])), ast.dump(f.args))
                seen.setdefault(key, []).append(name)
    assert [(k[0], v) for k, v in seen.items() if len(v) >= 3] == []


def test_no_run_of_20_identical_lines_in_two_model_scripts():
    """Two model scripts may share short runs (imports, the end of an epoch), never a copied block of 20 lines."""
    import difflib
    import itertools
    texts = {name: (REPO / name).read_text().splitlines() for name in SCRIPTS}
    longest = {(a, b): max(m.size for m in difflib.SequenceMatcher(None, texts[a], texts[b], autojunk=False)
                           .get_matching_blocks()) for a, b in itertools.combinations(SCRIPTS, 2)}
    assert {pair: size for pair, size in longest.items() if size >= 20} == {}
