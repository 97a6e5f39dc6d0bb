"""The resumable job directory OUT/.job/ of `bitplan profile`.

    state.json                  model identity and the result-affecting settings (the job's fingerprint)
    factors-a.safetensors       float64 running sums of half a's factors, with the next batch index
                                (factors-a.rank<r>of<w>.safetensors: process r's share of w, under torchrun;
                                factors-a.g<k>of<G>…: layer group k of --factor-groups G, with its own .done)
    factors-a.done              half a is complete: hessians/a/<layer>.safetensors are written, the sums dropped
    factors-b.*                 the same for half b
    noise/<layer>.json          α_noise measurement of one layer
    layers/<layer>.json         coefficients (traces, α_hessian, YAQA gains) of one layer
    formats/<layer>.json        relative error of one layer in every format asked for so far
    timing.json                 wall time per phase, summed over resumes (added at each checkpoint or result)
    peak_rss.json               the largest resident memory of any segment of the job
    lock                        the pid of the process writing the job (a second run into OUT is refused)

Every file is written atomically; a killed job resumes from the last file it finished. Windows are processed
in the same batches after a resume and labels are seeded per window, so the result equals an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import BitplanError
from ..io import atomic_path, read_json, write_json
from .factors import FactorSums, HalfFactors, sum_dtype
from .hessians import HESSIAN_DIR
from .schema import SCHEMA

JOB_DIR = ".job"
OUTPUTS = ("profile.json", "sensitivity.csv", HESSIAN_DIR, JOB_DIR)
LOCK = "lock"
_LOCK_GRACE_S = 60.0   # a lock file without a pid yet is being written by its taker, unless it is older than this


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        return True
    return True


def _lock_holder(path: Path) -> int | None:
    """The pid in a lock file that still binds: None when the file is gone, its process has ended, or it is
    this process's own (an earlier call that stopped with an exception)."""
    try:
        text = path.read_text().strip()
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    if not text.isdigit():
        return -1 if age < _LOCK_GRACE_S else None
    pid = int(text)
    return pid if pid != os.getpid() and _pid_alive(pid) else None


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


@dataclass
class Job:
    out: Path
    identity: dict[str, Any]       # {"weights_sha256", "model_id"}
    fingerprint: dict[str, Any]    # the settings that change results
    options: dict[str, Any]        # settings that do not (batch size, checkpoint interval): a resumed job keeps its own
    locked: bool = False           # this process holds OUT/.job/lock

    @property
    def dir(self) -> Path:
        return self.out / JOB_DIR

    # ------------------------------------------------------------------------------------ opening
    @classmethod
    def open(cls, out: str | Path, identity: dict[str, Any], fingerprint: dict[str, Any],
             options: dict[str, Any] | None = None, overwrite: bool = False,
             lock: bool = True) -> tuple["Job", bool]:
        """(job, complete): complete is True when OUT already holds a finished profile of these settings.

        Refuses (BitplanError, nothing touched) an OUT holding another model's profile or job, or the same
        model's with other settings, unless `overwrite`; then only bitplan's own outputs are removed.
        With `lock` (the one process that owns the job; under torchrun rank 0) it takes OUT/.job/lock, refusing
        an OUT that a live process is writing, and removes the temporary files of writes a killed run left."""
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise BitplanError(f"output path {out} is a file; pass a directory with --out")
        job = cls(out, identity, fingerprint, dict(options or {}))
        existing = job._existing()
        clear = False
        if existing is not None:
            what, ident, fp = existing
            if ident.get("weights_sha256") != identity["weights_sha256"]:
                if not overwrite:
                    raise BitplanError(
                        f"{out} holds a {what} of another model ({ident.get('model_id')}, weights "
                        f"{str(ident.get('weights_sha256'))[:12]}…, not {identity['weights_sha256'][:12]}…); "
                        "pass a new --out (or --overwrite to replace it)")
            elif fp != fingerprint:
                if not overwrite:
                    diff = "; ".join(_differences(fp, fingerprint))
                    raise BitplanError(f"{out} holds a {what} of this model with other settings ({diff}); "
                                       "pass a new --out, or --overwrite to replace it")
            elif what == "profile":
                if not overwrite:
                    return job, True
            clear = overwrite
        elif any((out / name).exists() for name in OUTPUTS[1:-1]) or job._has_files():
            if not overwrite:
                raise BitplanError(f"{out} holds profile files but no profile.json or job state; "
                                   "pass a new --out, or --overwrite to replace them")
            clear = True
        if lock:
            job.lock()
            job.remove_temporaries()
        if clear:
            job.clear()
        state = job.dir / "state.json"
        if state.is_file():
            # Same batches as before the interruption, so the resumed sums equal an uninterrupted run's.
            job.options.update(read_json(state, "profile job state").get("options", {}))
        job.dir.mkdir(parents=True, exist_ok=True)
        write_json(state, {"identity": identity, "fingerprint": fingerprint, "options": job.options})
        return job, False

    def _existing(self) -> tuple[str, dict, dict] | None:
        profile = self.out / "profile.json"
        if profile.is_file():
            data = read_json(profile, "profile")
            if not isinstance(data, dict) or data.get("schema") != SCHEMA:
                raise BitplanError(f"{profile} is not a bitplan profile; pass another --out")
            model = data.get("model", {})
            ident = {"weights_sha256": model.get("weights_sha256"), "model_id": model.get("id")}
            return "profile", ident, data.get("settings", {}).get("fingerprint", {})
        state = self.dir / "state.json"
        if state.is_file():
            data = read_json(state, "profile job state")
            return "partial profile job", data.get("identity", {}), data.get("fingerprint", {})
        return None

    def _has_files(self) -> bool:
        """Whether .job holds anything but a lock (a run stopped before writing its state leaves only that)."""
        return self.dir.is_dir() and any(p.name != LOCK for p in self.dir.iterdir())

    def clear(self) -> None:
        """Remove bitplan's outputs from OUT (never anything else a user keeps there), keeping this run's lock."""
        for name in OUTPUTS:
            p = self.out / name
            if p == self.dir and self.locked:
                for q in p.iterdir():
                    if q.name != LOCK:
                        shutil.rmtree(q) if q.is_dir() else q.unlink()
            elif p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    # ------------------------------------------------------------------------------------ one writer
    def lock(self) -> None:
        """Take OUT/.job/lock (created exclusively, holding this pid); a lock whose process has ended is taken
        over. Refuses while another live process holds it: two runs into one OUT would mix their files."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / LOCK
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _lock_holder(path)
                if holder is not None:
                    who = f"process {holder}" if holder > 0 else "another process"
                    raise BitplanError(f"another bitplan profile ({who}) is writing {self.out}; wait for it to "
                                       f"finish or pass another --out (if no such process runs, delete {path})")
                path.unlink(missing_ok=True)   # stale: its process has ended
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.locked = True
            return
        raise BitplanError(f"cannot take the lock {path}: other processes keep taking it; pass another --out")

    def unlock(self) -> None:
        if not self.locked:
            return
        path = self.dir / LOCK
        try:
            if path.read_text().strip() == str(os.getpid()):
                path.unlink()
        except FileNotFoundError:
            pass
        self.locked = False

    def remove_temporaries(self) -> None:
        """Delete the temporary files of atomic writes a killed run left in .job and hessians/ (a factor
        checkpoint's is as large as the checkpoint). Only the lock holder calls this: the files are nobody's."""
        for folder in (self.dir, self.out / HESSIAN_DIR):
            if folder.is_dir():
                for p in folder.rglob(".*.tmp"):
                    if p.is_file():
                        p.unlink(missing_ok=True)

    def finish(self, keep: bool = False) -> None:
        if not keep and self.dir.exists():
            shutil.rmtree(self.dir)
            self.locked = False
        else:
            self.unlock()

    @property
    def resumed(self) -> bool:
        return (any((self.dir / p).exists() for p in ("factors-a.done", "noise", "layers"))
                or any(self.dir.glob("factors-a*.safetensors")))

    def clock(self, enabled: bool = True) -> "PhaseClock":
        return PhaseClock(self, enabled)

    def add_time(self, phase: str, seconds: float) -> dict[str, float]:
        """Accumulate wall time per phase across resumes (timing.json), and keep the peak memory with it."""
        path = self.dir / "timing.json"
        times = read_json(path, "job timing") if path.is_file() else {}
        times[phase] = times.get(phase, 0.0) + seconds
        write_json(path, times)
        self.peak_rss_gb()
        return times

    def peak_rss_gb(self) -> float:
        """The largest resident memory of any process segment of the job so far (peak_rss.json: a killed segment's
        peak survives the resume, as of its last timed step), this process's included."""
        path = self.dir / "peak_rss.json"
        recorded = read_json(path, "job peak memory")["gb"] if path.is_file() else 0.0
        peak = max(recorded, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
        if peak > recorded:
            write_json(path, {"gb": peak})
        return peak

    # --------------------------------------------------------------------------- factor checkpoints
    def _ckpt(self, half: str, tag: str = "") -> Path:
        """`tag` names one process's share when several split the batches (a resume needs the same number)."""
        return self.dir / f"factors-{half}{tag}.safetensors"

    def save_half(self, state: HalfFactors, tag: str = "") -> None:
        tensors: dict[str, torch.Tensor] = {}
        stats: dict[str, list] = {}
        for name, s in state.layers.items():
            tensors[f"{name}.h_out"] = s.h_out.cpu()
            tensors[f"{name}.h_in"] = s.h_in.cpu()
            tensors[f"{name}.xtx"] = s.xtx.cpu()
            stats[name] = [s.grad_sq, s.samples, s.tokens, s.window_grad_sq]
        meta = {"half": state.half, "next_batch": state.next_batch, "stats": stats}
        with atomic_path(self._ckpt(state.half, tag)) as tmp:
            save_file(tensors, str(tmp), metadata={"bitplan": json.dumps(meta)})

    def load_half(self, half: str, shapes: dict[str, tuple[int, int]], tag: str = "",
                  device: torch.device | str = "cpu") -> HalfFactors:
        """The checkpointed sums of `half` on `device`, or zeros at batch 0 when there is none."""
        path = self._ckpt(half, tag)
        if not path.is_file():
            return HalfFactors(half, {n: FactorSums.zeros(*shape, device=device) for n, shape in shapes.items()}, 0)
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads(fh.metadata()["bitplan"])
            layers = {}
            for name in shapes:
                grad_sq, samples, tokens, *window = meta["stats"][name]   # older checkpoints lack window_grad_sq
                h_out, h_in, xtx = (fh.get_tensor(f"{name}.{k}").to(device, sum_dtype(device))
                                    for k in ("h_out", "h_in", "xtx"))
                layers[name] = FactorSums(h_out, h_in, xtx, grad_sq, samples, tokens,
                                          window[0] if window else None)
        return HalfFactors(half, layers, int(meta["next_batch"]))

    def half_done(self, half: str, part: str = "") -> bool:
        return (self.dir / f"factors-{half}{part}.done").is_file()

    def mark_half_done(self, half: str, part: str = "") -> None:
        """After the half's (or one layer group's, `part`) hessians/ files are written: its running sums are no
        longer needed."""
        write_json(self.dir / f"factors-{half}{part}.done", {"done": True})
        for path in self.dir.glob(f"factors-{half}{part}*.safetensors"):
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------ per-layer results
    def result(self, kind: str, name: str) -> dict | None:
        path = self.dir / kind / f"{name}.json"
        return read_json(path, f"{kind} result") if path.is_file() else None

    def save_result(self, kind: str, name: str, data: dict) -> None:
        write_json(self.dir / kind / f"{name}.json", data)



class PhaseClock:
    """Wall time of the running phase, added to timing.json at each `tick` (each checkpoint or per-layer
    result), so a killed phase loses at most the time since its last result."""

    def __init__(self, job: Job, enabled: bool = True):
        self.job, self.enabled = job, enabled
        self.phase: str | None = None
        self.t0 = 0.0

    def start(self, phase: str) -> None:
        self.stop()
        self.phase, self.t0 = phase, time.perf_counter()

    def tick(self) -> dict[str, float]:
        now = time.perf_counter()
        if self.phase is None or not self.enabled:
            return {}
        times = self.job.add_time(self.phase, now - self.t0)
        self.t0 = now
        return times

    def stop(self) -> dict[str, float]:
        times = self.tick()
        self.phase = None
        return times
