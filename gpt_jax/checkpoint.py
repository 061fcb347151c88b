"""Checkpoints with orbax: save, restore, latest step. Nothing else.

`out_dir/checkpoints/<kind>/<step>/` for kind "latest" and "best", one step kept each. Each holds `state`
(the TrainState's arrays: params, optimizer state, step, RNG) and `meta` (JSON: the config, the tokenizer,
the best val loss). orbax writes into a temporary folder and renames it when complete, so a run killed
mid-save leaves the previous checkpoint loadable; loading reads arrays and JSON only, never code.
"""

import logging
from pathlib import Path

import orbax.checkpoint as ocp

from gpt_jax.errors import CheckpointError, first_line

KINDS = ("latest", "best")
logging.getLogger("absl").setLevel(logging.CRITICAL)  # orbax's failures surface as CheckpointError instead


def _manager(out_dir: str | Path, kind: str, create: bool = False) -> ocp.CheckpointManager:
    directory = (Path(out_dir) / "checkpoints" / kind).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=create, enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory, options=options)


def latest_step(out_dir: str | Path, kind: str = "latest") -> int | None:
    """The step of the complete checkpoint of this kind, or None when there is none."""
    if not (Path(out_dir) / "checkpoints" / kind).is_dir():
        return None
    with _manager(out_dir, kind) as mngr:
        return mngr.latest_step()


def save(out_dir: str | Path, kind: str, step: int, state, meta: dict) -> None:
    """Write `state` (a pytree of arrays) and `meta` (JSON-able) as the `kind` checkpoint at `step`."""
    try:
        with _manager(out_dir, kind, create=True) as mngr:
            mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                      force=True)
            mngr.wait_until_finished()
    except (OSError, ValueError, RuntimeError) as e:  # disk full, permissions (orbax/tensorstore raise ValueError)
        # orbax wrote into a temporary folder, so the previous checkpoint stands
        disk_full = "No space left" in str(e) or "RESOURCE_EXHAUSTED" in str(e)
        reason = "no space left on device" if disk_full else first_line(e, 160)
        raise CheckpointError(
            f"could not save the {kind} checkpoint at step {step} in {out_dir} ({reason}); the previous "
            f"checkpoint is kept. Free disk space or choose another --out_dir, then --resume"
        ) from None


def read_meta(out_dir: str | Path, kind: str = "latest") -> tuple[int, dict]:
    """(step, meta) of the newest checkpoint of this kind; CheckpointError if there is none or it is damaged."""
    step = _require_step(out_dir, kind)
    try:
        with _manager(out_dir, kind) as mngr:
            meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # orbax raises many types for damaged folders
        raise _damaged(out_dir, kind, step, e) from None
    return step, dict(meta)


def restore(out_dir: str | Path, kind: str, abstract_state) -> tuple[object, dict]:
    """(state, meta) of the newest `kind` checkpoint; `abstract_state` gives the tree, shapes and shardings."""
    step = _require_step(out_dir, kind)
    try:
        with _manager(out_dir, kind) as mngr:
            out = mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as e:
        raise _damaged(out_dir, kind, step, e) from None
    return out["state"], dict(out["meta"])


def _require_step(out_dir, kind) -> int:
    step = latest_step(out_dir, kind)
    if step is None:
        raise CheckpointError(
            f"no checkpoint in {Path(out_dir) / 'checkpoints' / kind}; train one first: python train.py --out_dir={out_dir}"
        )
    return step


def _damaged(out_dir, kind, step, error: Exception) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {Path(out_dir) / 'checkpoints' / kind / str(step)} cannot be loaded ({first_line(error)}); "
        f"if it is damaged, delete that folder to fall back to an older one; if it is from another version or "
        f"optimizer setting, resume with that"
    )
