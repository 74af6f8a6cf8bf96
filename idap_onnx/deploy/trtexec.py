"""The ``trtexec`` latency backend: TensorRT's own benchmark tool, found on the PATH.

``trtexec`` ships with TensorRT's tar/deb packages and NGC containers, not with the Python
wheel. Its options changed at TensorRT 11, so every command is built for the major version
read from its banner (``&&&& RUNNING TensorRT.trtexec [TensorRT v110400] [b12] # ...``; the
number is ``major * 10000 + minor * 100 + patch`` from 10 on, ``major * 1000 + ...`` before):

- build (once per model): ``--onnx=FILE --saveEngine=PLAN --skipInference``, the profile
  (``--shapes`` or ``--minShapes/--optShapes/--maxShapes``), ``--timingCacheFile``; on 10 also
  ``--stronglyTyped`` (precision from the file; on 11 it is the default and the flag a no-op).
  No ``--fp16``/``--int8`` ever: 11 removed them, and an fp16 or QDQ ONNX carries its precision.
- time (once per round): ``--loadEngine=PLAN --shapes=... --warmUp=MS --iterations=N
  --duration=0 --exportTimes=JSON``; on 10 also ``--useCudaGraph --noDataTransfers`` (CUDA
  graph replay without host/device copies, the default on 11).

Times come from the ``--exportTimes`` file: a JSON array with one object per timed iteration
(``startEnqMs``, ``endEnqMs``, ``startComputeMs``, ``endComputeMs``, ``h2dMs``, ``computeMs``,
``d2hMs``, ``latencyMs``, ...); a sample is its ``computeMs``, the GPU time of one inference,
as the ``tensorrt`` backend's CUDA events measure it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from idap_onnx.deploy.tensorrt import ShapeProfile
from idap_onnx.errors import IdapError

_BANNER = re.compile(r"TensorRT v(\d+)")
TIME_KEY = "computeMs"


@dataclass(frozen=True)
class Trtexec:
    """A ``trtexec`` executable and the TensorRT version it reports."""

    path: str
    version: tuple[int, int, int]

    @property
    def major(self) -> int:
        return self.version[0]

    def build_command(
        self, onnx_path: str | os.PathLike, engine_path: str | os.PathLike,
        profile: ShapeProfile | None = None, timing_cache: str | os.PathLike | None = None,
    ) -> list[str]:
        """The command that builds ``onnx_path`` into ``engine_path`` (module docstring)."""
        cmd = [self.path, f"--onnx={onnx_path}", f"--saveEngine={engine_path}", "--skipInference"]
        if self.major < 11:
            cmd.append("--stronglyTyped")
        cmd += (profile or ShapeProfile({})).trtexec_args()
        if timing_cache is not None:
            cmd.append(f"--timingCacheFile={timing_cache}")
        return cmd

    def time_command(
        self, engine_path: str | os.PathLike, export_times: str | os.PathLike, *,
        shapes: ShapeProfile | None = None, iterations: int = 10, warmup_ms: int = 200,
    ) -> list[str]:
        """The command that times ``iterations`` runs of ``engine_path`` into ``export_times``."""
        cmd = [self.path, f"--loadEngine={engine_path}"]
        if shapes is not None and shapes.shapes:
            cmd.append("--shapes=" + ",".join(
                f"{n}:{'x'.join(map(str, s[1]))}" for n, s in shapes.shapes.items()))
        cmd += [f"--warmUp={warmup_ms}", f"--iterations={iterations}", "--duration=0",
                f"--exportTimes={export_times}"]
        if self.major < 11:
            cmd += ["--useCudaGraph", "--noDataTransfers"]
        return cmd


def parse_version(banner: str) -> tuple[int, int, int]:
    """(major, minor, patch) from trtexec's banner text; IdapError when none is in it."""
    match = _BANNER.search(banner)
    if match is None:
        raise IdapError("cannot read the TensorRT version from trtexec's output (no "
                        "'[TensorRT vNNNNNN]' banner); is it TensorRT's trtexec?")
    n = int(match.group(1))
    if n >= 100000:  # 10.x on: major * 10000 + minor * 100 + patch
        return n // 10000, n // 100 % 100, n % 100
    return n // 1000, n // 100 % 10, n % 100


def parse_times(text: str) -> list[float]:
    """The ``computeMs`` of every iteration in an ``--exportTimes`` JSON text, in order."""
    try:
        rows = json.loads(text)
        times = [float(row[TIME_KEY]) for row in rows]
    except (ValueError, TypeError, KeyError) as exc:
        raise IdapError(f"trtexec's --exportTimes file is not the documented JSON array of "
                        f"iterations with '{TIME_KEY}' ({exc})") from exc
    if not times:
        raise IdapError("trtexec's --exportTimes file holds no timed iteration")
    return times


def find_trtexec() -> Trtexec | None:
    """The ``trtexec`` on the PATH and its version, or None when there is none."""
    path = shutil.which("trtexec")
    if path is None:
        return None
    banner = _run([path, "--help"], check=False)
    return Trtexec(path, parse_version(banner))


def require_trtexec() -> Trtexec:
    """:func:`find_trtexec`, or LatencyUnavailable; TensorRT before 10 is declined."""
    from idap_onnx.deploy.latency import LatencyUnavailable

    found = find_trtexec()
    if found is None:
        raise LatencyUnavailable(
            "the trtexec backend needs TensorRT's 'trtexec' on the PATH (it ships with the "
            "TensorRT tar/deb packages and NGC containers, not with the pip wheel)"
        )
    if found.major < 10:
        raise LatencyUnavailable(
            f"trtexec at {found.path} is TensorRT {'.'.join(map(str, found.version))}; "
            "idap-onnx builds strongly typed engines with TensorRT 10 or later"
        )
    return found


def _run(cmd: list[str], check: bool = True) -> str:
    """stdout and stderr of ``cmd``; IdapError with its last lines when it fails."""
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    out = done.stdout + done.stderr
    if check and done.returncode != 0:
        errors = [line for line in out.splitlines() if "[E]" in line] or out.splitlines()[-5:]
        raise IdapError(f"{Path(cmd[0]).name} failed (exit {done.returncode}): "
                        + "\n  ".join(["", *errors]))
    return out


def build(tool: Trtexec, onnx_path: Path, engine_path: Path, profile: ShapeProfile,
          timing_cache: Path | None = None) -> Path:
    """Build an engine with ``trtexec`` into ``engine_path``."""
    _run(tool.build_command(onnx_path, engine_path, profile, timing_cache))
    if not engine_path.is_file():
        raise IdapError(f"trtexec wrote no engine for {onnx_path.name}")
    return engine_path


def time_engine(tool: Trtexec, engine_path: Path, export_times: Path, shapes: ShapeProfile,
                iterations: int, warmup_ms: int = 200) -> list[float]:
    """``iterations`` GPU compute times (ms) of ``engine_path``, from one trtexec run."""
    _run(tool.time_command(engine_path, export_times, shapes=shapes, iterations=iterations,
                           warmup_ms=warmup_ms))
    return parse_times(export_times.read_text())
