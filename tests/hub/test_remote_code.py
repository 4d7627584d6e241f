"""The published folder loads through AutoModelForCausalLM: in a virtual environment WITHOUT this package (remote
code, trust_remote_code=True), and with the package installed (registration, no trust_remote_code)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import modeling_deepseek_v3

PROMPT = "DeepSeek-V3 publishes its weights in FP8."
NEW_TOKENS = 8

# Runs inside the bare venv. Everything it needs comes from the published folder; results go back via torch.save.
REMOTE_SCRIPT = """
import importlib.util, sys, torch
assert importlib.util.find_spec("modeling_deepseek_v3") is None, "the package leaked into the bare venv"
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, out = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
ids = torch.tensor([tok(sys.argv[3])["input_ids"]])
with torch.no_grad():
    logits = model(ids).logits
gen = model.generate(ids, max_new_tokens=int(sys.argv[4]), do_sample=False)
torch.save({"module": type(model).__module__, "ids": ids, "logits": logits, "generated": gen,
            "package_imported": any(m.startswith("modeling_deepseek_v3") for m in sys.modules)}, out)
"""


def make_bare_venv(root: Path) -> Path:
    """A venv that sees the system site-packages (torch, transformers, ...) through a plain path .pth, and not
    this package: its editable install is an import hook installed by an `import` line in a .pth file of
    site-packages, and .pth files inside a directory added by another .pth are never processed."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    venv_site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    # Every directory a fresh run of this interpreter imports from (site-packages, dist-packages, user site, ...),
    # except any that holds the package itself (a repo root, or an editable install in path mode). Asked of a new
    # process, not read off this one's sys.path: in-process additions such as transformers' own modules cache (put
    # there once any earlier test loaded remote code) would shadow the HF_MODULES_CACHE the test sets.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    fresh = subprocess.run([sys.executable, "-c", "import json, sys; print(json.dumps(sys.path))"], cwd=root.parent,
                           env=env, check=True, capture_output=True, text=True).stdout  # fmt: skip
    paths = [p for p in dict.fromkeys(json.loads(fresh))
             if p and Path(p).is_dir() and not (Path(p) / "modeling_deepseek_v3").exists()]  # fmt: skip
    (Path(venv_site) / "system_site_packages.pth").write_text("\n".join(paths) + "\n")
    return python


def reference(model, ids):
    with torch.no_grad():
        logits = model(ids).logits
    return logits, model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)


def test_bare_venv_loads_the_folder_with_remote_code(original, published, tmp_path):
    python = make_bare_venv(tmp_path / "venv")
    script, out = tmp_path / "remote.py", tmp_path / "remote.pt"
    script.write_text(REMOTE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env |= {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    # cwd away from the repo: `python script` puts the script's folder, not the cwd, on sys.path, but be explicit.
    proc = subprocess.run([python, script, published, out, PROMPT, str(NEW_TOKENS)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    remote = torch.load(out)
    assert remote["module"].startswith("transformers_modules.") and not remote["package_imported"]
    assert (tmp_path / "modules" / "transformers_modules").is_dir()  # the code was copied where we said

    model, _ = original
    logits, generated = reference(model, remote["ids"])
    assert torch.equal(remote["logits"], logits)
    assert torch.equal(remote["generated"], generated)
    assert generated.shape[1] > remote["ids"].shape[1]


def test_package_loads_the_folder_without_trust_remote_code(original, published):
    model = AutoModelForCausalLM.from_pretrained(published)  # registration: no remote code, no prompt
    assert type(model) is modeling_deepseek_v3.DSV3ForCausalLM
    ids = torch.tensor([[0, 5, 17, 300, 4000, 12, 9]])
    for got, want in zip(reference(model, ids), reference(original[0], ids), strict=True):
        assert torch.equal(got, want)
