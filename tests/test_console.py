"""The `sdo` console script settles OpenMP's wait policy before torch is imported."""

import os
import subprocess
import sys
from importlib import metadata

from sdo_lightning.console import CPU_THREAD_DEFAULTS, configure_cpu_threads


def test_the_console_script_is_the_launcher():
    (script,) = [ep for ep in metadata.entry_points(group="console_scripts") if ep.name == "sdo"]
    assert script.value == "sdo_lightning.console:main"


def test_importing_the_package_and_the_launcher_does_not_import_torch():
    """OpenMP reads OMP_WAIT_POLICY once, when torch loads it: the launcher must run first."""
    code = ("import sys, sdo_lightning, sdo_lightning.console; "
            "print(sorted(m for m in ('torch', 'lightning', 'jsonargparse') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_launcher_sets_what_is_unset_and_keeps_what_the_user_set():
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert configure_cpu_threads(env) == {} and env == {"OMP_WAIT_POLICY": "ACTIVE"}
    env = {}
    assert configure_cpu_threads(env) == CPU_THREAD_DEFAULTS == env


def test_python_dash_m_runs_the_command():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = ("import runpy, sys, os; sys.argv = ['sdo', 'plugins']; runpy.run_module('sdo_lightning', run_name='__main__'); "
            "print('policy', os.environ['OMP_WAIT_POLICY'])")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "ShortcutGradient" in run.stdout and "policy PASSIVE" in run.stdout


def test_the_public_names_resolve_lazily():
    import sdo_lightning
    from sdo_lightning import contracts, searches
    from sdo_lightning.sampling import loop, picard

    public = {**{n: getattr(contracts, n) for n in ("GradientMode", "GradientPlan", "Objective", "Solver",
                                                     "SolverState", "Target")},
              **{n: getattr(picard, n) for n in ("Picard", "PicardStats")},
              **{n: getattr(loop, n) for n in ("Denoiser", "Step", "StepCallback", "sample")},
              **{n: getattr(searches, n) for n in ("BestOfN", "Search", "SearchMode", "ZeroOrder")}}
    assert sorted(sdo_lightning.__all__) == sorted(public)
    assert all(getattr(sdo_lightning, name) is obj for name, obj in public.items())
