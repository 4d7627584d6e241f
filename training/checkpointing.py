"""Crash-safe training checkpoints on top of `accelerator.save_state`.

Layout under `<output_dir>/checkpoints/`: one complete folder per saved step (`step-0000050/`), a `LATEST` file
naming the newest complete one, and, only while a save is in progress, a `.tmp-step-*` folder. A checkpoint is
written entirely into the temporary folder, then renamed into place (a rename is atomic on one filesystem) and only
then is `LATEST` replaced (write a temp file, `os.replace`). A process killed mid-write therefore leaves the last
good checkpoint and `LATEST` untouched; the stale temporary folder is ignored and removed by the next save.

Each checkpoint also holds `run.json` (the model config and the arguments that define the run), so a resume from
another run's folder fails with a message that names the differences before anything is loaded.
"""

from __future__ import annotations

import json
import os
import shutil

from accelerate import Accelerator

LATEST = "LATEST"
RUN_INFO = "run.json"


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(accelerator: Accelerator, root: str, step: int, run_info: dict, keep: int | None = None) -> str:
    """Write a checkpoint of everything registered with the accelerator; returns its folder. All ranks call it."""
    name = f"step-{step:07d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f".tmp-{name}")
    if accelerator.is_main_process:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, RUN_INFO), "w") as f:
            json.dump(run_info, f, indent=2, sort_keys=True)
        if os.path.exists(final):  # the same step saved again (e.g. after a resume): keep the old one until done
            shutil.rmtree(final)
        os.rename(tmp, final)
        _atomic_write_text(os.path.join(root, LATEST), name)
        for stale in list_checkpoints(root)[: -keep if keep else 0]:
            shutil.rmtree(os.path.join(root, stale))
        for entry in os.listdir(root):  # leftovers of a killed save
            if entry.startswith(".tmp-"):
                shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def list_checkpoints(root: str) -> list[str]:
    """Complete checkpoint folders, oldest first (temporary folders excluded)."""
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if d.startswith("step-") and os.path.isdir(os.path.join(root, d)))


def latest_checkpoint(root: str) -> str | None:
    path = os.path.join(root, LATEST)
    if os.path.exists(path):
        with open(path) as f:
            name = f.read().strip()
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    found = list_checkpoints(root)
    return os.path.join(root, found[-1]) if found else None


def check_same_run(checkpoint: str, run_info: dict) -> None:
    """Raise ValueError naming every field where the checkpoint's run differs from this one."""
    with open(os.path.join(checkpoint, RUN_INFO)) as f:
        saved = json.load(f)
    current = json.loads(json.dumps(run_info))  # same normalisation as the saved file (tuples -> lists)
    diffs = []
    for section in sorted(set(saved) | set(current)):
        old, new = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                diffs.append(f"{section}.{key}: checkpoint {old.get(key)!r} vs now {new.get(key)!r}")
    if diffs:
        raise ValueError(f"cannot resume from {checkpoint}: it belongs to a different run:\n  " + "\n  ".join(diffs))
