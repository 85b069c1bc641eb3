"""The docs cannot rot: every ```python block and every `python -m lmops_jax ...` command of docs/*.md runs
as a subprocess, page by page, top to bottom, as a reader would run them.

What runs: every ```python block, and every other block with a line starting `python -m lmops_jax`, whole,
in bash (so `FLAGS=...` and here-documents work; variables that earlier blocks of the page set are set
again). Blocks of gin text or of flags alone are reference, not commands; a Python snippet that is not
meant to run goes in a ```text block.

Where: each page gets a folder standing for the machine's root. Absolute paths under /tmp, /data,
/models, /ckpt and /runs are redirected into it, and the inputs pages assume exist are made there first
(`_inputs`): text files in /data, a checkpoint of the tiny Llama in /runs/pretrain, and a Hugging Face
directory of that model with a tokenizer in /models/llama. A training command that names no MODEL_DIR
(the quickstart config's default is /tmp/lmops_jax_quickstart) gets one in the folder.

Sizes (what the test substitutes, so the pages can show real sizes): training jobs (`lmops_jax.train`,
`lmops_jax.distillation`) get TRAIN_STEPS=2, BATCH_SIZE=4, TASK_FEATURE_LENGTHS={'targets': 32},
EVAL_STEPS=1 appended; `lmops_jax.infer` gets NUM_EXAMPLES=4, MAX_NEW_TOKENS=8; python blocks get
`train_steps=2`; `gin_configs/models/llama_small.gin` becomes `llama_tiny.gin`. Optional flags written
`[--flag=...]` are left out and a leading `pip install ... &&` is dropped. Every run sees one CPU device
and shares a persistent compilation cache, so a program compiled for one command is reused by the next.
"""
import dataclasses
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import pytest

from tests.helpers import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
ROOTS = ("tmp", "data", "models", "ckpt", "runs")
ROOTED_PATH = re.compile(r"(?<![\w.~/-])/(%s)(?=/)" % "|".join(ROOTS))
FENCE = re.compile(r"^```([\w-]*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
COMMAND = re.compile(r"\bpython -m (lmops_jax[\w.]*)")
NEEDS = re.compile(r"<!-- test_docs: needs (\w+)")
# Paths in the repository a command names relative to its root (`python scripts/x.py`, the shipped corpus): the
# blocks run in a scratch root, so they are made absolute.
REPO_RELATIVE = re.compile(r"(?<![\w./-])(scripts|lmops_jax)/")
COMMAND_LINE = re.compile(r"^\s*(?:pip install [^&\n]*&&\s*)?python -m lmops_jax", re.M)
TRAIN_FLAGS = ("--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=4", "--gin.TASK_FEATURE_LENGTHS=\"{'targets': 32}\"",
               "--gin.EVAL_STEPS=1")
JOB_FLAGS = {"lmops_jax.train": TRAIN_FLAGS, "lmops_jax.distillation": TRAIN_FLAGS,
             "lmops_jax.infer": ("--gin.NUM_EXAMPLES=4", "--gin.MAX_NEW_TOKENS=8")}
SUBSTITUTIONS = ((re.compile(r"gin_configs/models/llama_small\.gin"), "gin_configs/models/llama_tiny.gin"),
                 (re.compile(r"pip install [^&\n]*&&\s*"), ""),
                 (re.compile(r"[ \t]\[--[^\]\n]*\]"), ""))
PYTHON_SUBSTITUTIONS = ((re.compile(r"\btrain_steps=\d+"), "train_steps=2"),)
TEXT = ["the cat sat on the mat.", "a small corpus for the docs test, one example a line.",
        "abcabcabc abcabc", "hello world, hello docs."]


@dataclasses.dataclass(frozen=True)
class Block:
    page: str
    line: int
    kind: str  # "python" or "sh"
    text: str

    def __str__(self) -> str:
        return f"docs/{os.path.basename(self.page)}:{self.line} ({self.kind} block)"


def _blocks(page: str) -> list[Block]:
    """The page's runnable blocks in order (module docstring)."""
    text = open(page, encoding="utf-8").read()
    blocks = []
    for match in FENCE.finditer(text):
        language, body = match.group(1), match.group(2)
        line = text.count("\n", 0, match.start()) + 1
        if language == "python":
            blocks.append(Block(page, line, "python", body))
        elif language in ("", "sh", "bash", "shell", "console") and COMMAND_LINE.search(body):
            blocks.append(Block(page, line, "sh", body))
    return blocks


def _logical_lines(text: str) -> list[list[str]]:
    """Physical lines grouped into commands (a trailing backslash continues one)."""
    groups, current = [], []
    for line in text.splitlines():
        current.append(line)
        if not line.rstrip().endswith("\\"):
            groups.append(current)
            current = []
    return groups + ([current] if current else [])


def _with_flags(group: list[str], variables: dict[str, str], root: str) -> list[str]:
    """A command's lines with the job's size flags (and a MODEL_DIR for training) appended before any
    trailing comment."""
    joined = " ".join(group)
    match = COMMAND.search(joined)
    if match is None:
        return group
    job = match.group(1)
    # A command that sets its own (small) TASK_FEATURE_LENGTHS keeps them: an encoder-decoder task needs inputs too.
    flags = [f for f in JOB_FLAGS.get(job, ()) if not (f.startswith("--gin.TASK_FEATURE_LENGTHS=")
                                                       and "--gin.TASK_FEATURE_LENGTHS=" in joined)]
    expanded = re.sub(r"\$(\w+)", lambda m: variables.get(m.group(1), ""), joined)
    if job == "lmops_jax.train" and "MODEL_DIR" not in expanded:
        flags.append(f"--gin.MODEL_DIR=\"'{root}/tmp/default_model_dir'\"")
    code, background, comment = re.match(r"^(.*?)(\s*&)?(\s+#\s.*)?$", group[-1]).groups()
    return group[:-1] + [code + "".join(" " + f for f in flags) + (background or "") + (comment or "")]


def _in_repo(line: str) -> str:
    """`python` as this interpreter (for a job or a script), and repository paths absolute (REPO_RELATIVE)."""
    line = re.sub(r"\bpython (-m |scripts/)", lambda m: shlex.quote(sys.executable) + " " + m.group(1), line)
    return REPO_RELATIVE.sub(lambda m: f"{REPO}/{m.group(1)}/", line)


def _shell_script(text: str, variables: dict[str, str], root: str) -> str:
    """A block's (redirected) text as a bash script; records the variables it assigns for the page's later
    blocks."""
    lines = [f"{name}={shlex.quote(value)}" for name, value in variables.items()]
    for group in _logical_lines(text):
        assignment = re.match(r"^(\w+)=\"(.*)\"$", " ".join(g.rstrip("\\").strip() for g in group), re.S)
        if assignment:
            variables[assignment.group(1)] = assignment.group(2)
        lines.extend(_in_repo(line) for line in _with_flags(group, variables, root))
    return "set -euo pipefail\n" + "\n".join(lines) + "\n"


def _redirect(text: str, root: str) -> str:
    for pattern, replacement in SUBSTITUTIONS:
        text = pattern.sub(replacement, text)
    return ROOTED_PATH.sub(lambda m: f"{root}/{m.group(1)}", text)


def _inputs(template: str) -> None:
    """What the pages assume exists, under `template` (a root): /data text, /runs/pretrain, /models/llama."""
    from lmops_jax import checkpoints, convert
    from lmops_jax.models import loading
    from lmops_jax.models.spec import ModelSpec, VocabularySpec
    from tests.data.test_hf_tokenizer import _byte_level_bpe

    os.makedirs(os.path.join(template, "data"))
    for name in ("train.txt", "valid.txt"):
        with open(os.path.join(template, "data", name), "w", encoding="utf-8") as f:
            f.write("\n".join(TEXT * 8) + "\n")
    config = open(os.path.join(REPO, "lmops_jax", "gin_configs", "models", "llama_tiny.gin")).read()
    model = loading.spec_from_gin(config).model
    boxed = model.init_params(jax.random.key(0), model.input_shapes(1, {"targets": 8}))
    params = jax.device_get(nn.meta.unbox(boxed))
    pretrain = os.path.join(template, "runs", "pretrain")
    checkpoints.save_params(pretrain, params, config, model_spec=ModelSpec(model, VocabularySpec("byte")).to_json())
    convert.export_hf(pretrain, os.path.join(template, "models", "llama"))
    _byte_level_bpe(os.path.join(template, "models", "llama"))



@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    template = str(tmp_path_factory.mktemp("docs_inputs"))
    _inputs(template)
    return template


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("docs_compile_cache"))


def _env(compile_cache: str) -> dict:
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
                JAX_COMPILATION_CACHE_DIR=compile_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1", PYTHONPATH=REPO)


def test_every_page_has_its_blocks_found():
    """The extraction itself: the pages that document commands yield blocks of both kinds."""
    blocks = [b for page in PAGES for b in _blocks(page)]
    assert {b.kind for b in blocks} == {"python", "sh"}
    names = {os.path.basename(b.page) for b in blocks}
    assert {"quickstart.md", "inference.md", "finetuning.md", "distillation.md"} <= names
    assert "architecture.md" not in names  # its diagrams name commands without being commands
    text = _redirect("pip install -e \".[all]\" && python -m lmops_jax.train \\\n"
                     "  --gin_file=gin_configs/models/llama_small.gin   # a comment\n", "/r")
    script = _shell_script(text, {}, "/r")
    assert "pip install" not in script and "llama_tiny.gin --gin.TRAIN_STEPS=2" in script
    assert script.rstrip().endswith("/r/tmp/default_model_dir'\"   # a comment")
    own = _shell_script("python -m lmops_jax.train --gin.TASK_FEATURE_LENGTHS=\"{'inputs': 8, 'targets': 8}\"\n", {}, "/r")
    assert own.count("TASK_FEATURE_LENGTHS") == 1 and "--gin.TRAIN_STEPS=2" in own
    background = _shell_script("python -m lmops_jax.infer --gin.X=1 &  # serve\n", {}, "/r")
    assert background.rstrip().endswith("--gin.X=1 --gin.NUM_EXAMPLES=4 --gin.MAX_NEW_TOKENS=8 &  # serve")
    assert _redirect("x('/tmp/a', \"/models/b\") /work/tmp/c", "/r") == "x('/r/tmp/a', \"/r/models/b\") /work/tmp/c"


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p)], ids=os.path.basename)
def test_page_runs(page, inputs, compile_cache, tmp_path):
    needs = NEEDS.search(open(page, encoding="utf-8").read())
    if needs:  # a page for an optional extra; tests/data/test_t5_extra.py runs it where the extra is installed
        pytest.importorskip(needs.group(1))
    root = str(tmp_path / "root")
    shutil.copytree(inputs, root)
    variables: dict[str, str] = {}
    port = str(free_port())  # a server a page starts on port 8000 gets a free one
    for block in _blocks(page):
        text = _redirect(block.text, root)  # before anything adds paths inside the root
        text = text.replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace("--gin.PORT=8000", f"--gin.PORT={port}")
        if block.kind == "python":
            path = os.path.join(root, f"block_{block.line}.py")
            for pattern, replacement in PYTHON_SUBSTITUTIONS:
                text = pattern.sub(replacement, text)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            cmd = [sys.executable, path]
        else:
            cmd = ["bash", "-c", _shell_script(text, variables, root)]
        run = subprocess.run(cmd, cwd=root, env=_env(compile_cache), capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, (f"{block} failed with exit code {run.returncode}:\n{cmd[-1]}\n"
                                     f"{run.stdout[-3000:]}\n{run.stderr[-5000:]}")
