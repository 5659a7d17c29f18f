"""`python -m experiments.aot`: the tiny preset compiled for real TPU topologies on a CPU host.

The compiles need libtpu (the `tpu` extra) and are skipped without it; the pure helpers run everywhere. Each compile runs in a subprocess with
``TPU_SKIP_MDS_QUERY=1 JAX_PLATFORMS=cpu``, as the command's documentation says to run it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import types
from unittest import mock

import pytest

from experiments.aot import collectives, pallas_calls

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason='libtpu not installed (pip install -e ".[tpu]")')
ENV = {**os.environ, "TPU_SKIP_MDS_QUERY": "1", "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "XLA_FLAGS": ""}


NOTEBOOK = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "colab_quickstart.ipynb"


def _aot(tmp_path, topology, *args, preset="tiny"):
    out = tmp_path / topology
    res = subprocess.run([sys.executable, "-m", "experiments.aot", "--preset", preset, "--topology", topology,
                          "--out", str(out), *args], env=ENV, capture_output=True, text=True, timeout=900)
    rows = json.loads((out / "aot.json").read_text())["programs"] if (out / "aot.json").exists() else None
    return res, rows


@needs_libtpu
@pytest.mark.parametrize("topology", ["v5e-4", "v4-8"])
def test_every_program_compiles_with_the_pallas_kernels_and_reports_memory(tmp_path, topology):
    res, rows = _aot(tmp_path, topology, "--set", "attention_impl=pallas", "--programs", "dpo_step", "reference_logps", "sft_step")
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["program"] for r in rows] == ["dpo_step", "reference_logps", "sft_step"]
    for r in rows:
        assert r["compiled"] and r["fits"] and r["chips"] == 4
        assert 0 < r["total_bytes"] < r["hbm_bytes"] and r["temp_bytes"] > 0
        # tiny has 2 layers: forward kernels in every program, backward ones in the train steps
        assert r["pallas_calls"] >= 2, r
        assert r["collectives"]["all-gather"]["count"] > 0  # parameters are sharded over fsdp
    assert "| dpo_step |" in res.stdout


@needs_libtpu
def test_the_sampler_calls_compile_with_the_decode_kernel_and_xla_builds_none(tmp_path):
    sampling = ["--programs", "actor", "judge", "judge_readout", "--prompt-len", "24"]
    res, rows = _aot(tmp_path, "v5e-4", "--set", "attention_impl=pallas", *sampling)
    assert res.returncode == 0, res.stderr[-3000:]
    by_name = {r["program"]: r for r in rows}
    # the judge's prompts share the rubric: prefilled once into the prefix every row attends to
    assert {"actor.prefill", "actor.start", "actor.decode", "judge.prefill", "judge.prefix", "judge.start",
            "judge.decode", "judge_readout.next_token"} <= set(by_name), sorted(by_name)
    for r in rows:
        assert r["compiled"] and r["fits"] and 0 < r["total_bytes"] < r["hbm_bytes"], r
    assert by_name["actor.decode"]["pallas_calls"] >= 2  # the decode kernel in each of the 2 layers
    assert by_name["actor.prefill"]["pallas_calls"] >= 2  # flash attention over the prompt
    res, rows = _aot(tmp_path / "xla", "v5e-4", "--set", "attention_impl=xla", *sampling)
    assert res.returncode == 0, res.stderr[-3000:]
    assert all(r["pallas_calls"] == 0 for r in rows)


@needs_libtpu
def test_the_temporal_future_dpo_step_holds_m_t_beside_it(tmp_path):
    res, rows = _aot(tmp_path, "v5e-4", "--set", "temporal=true", "--programs", "dpo_step", "future_dpo_step")
    assert res.returncode == 0, res.stderr[-3000:]
    plain, future = rows
    assert future["program"] == "future_dpo_step" and future["compiled"] and future["fits"]
    saved = json.loads((tmp_path / "v5e-4" / "aot.json").read_text())  # written after each program
    assert saved["complete"] is True and saved["compiling"] is None
    # the same step, plus M_t's parameters resident as arguments
    assert future["argument_bytes"] > plain["argument_bytes"]
    res = subprocess.run([sys.executable, "-m", "experiments.aot", "--preset", "tiny", "--topology", "v5e-4",
                          "--programs", "future_dpo_step"], env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "known programs" in res.stderr  # only with temporal=true


@needs_libtpu
def test_auto_on_a_tpu_mesh_builds_mosaic_kernels_and_xla_builds_none(tmp_path):
    res, rows = _aot(tmp_path, "v5e-4", "--set", "attention_impl=auto", "--programs", "reference_logps")
    assert res.returncode == 0, res.stderr[-3000:]
    assert rows[0]["pallas_calls"] == 2  # the host is a CPU, but the target decides
    res, rows = _aot(tmp_path / "xla", "v5e-4", "--set", "attention_impl=xla", "--programs", "reference_logps")
    assert res.returncode == 0 and rows[0]["pallas_calls"] == 0


@needs_libtpu
def test_a_batch_too_large_for_the_chip_is_reported_as_not_fitting(tmp_path):
    res, rows = _aot(tmp_path, "v5e-4", "--programs", "reference_logps", "--set", "dpo.ref_batch_size=8192",
                     "--set", "dpo.max_len=4096")
    assert res.returncode == 1  # a program that does not fit is not a success
    (row,) = rows
    assert not row["fits"]
    assert (not row["compiled"]) or row["margin_bytes"] < 0
    assert "| reference_logps |" in res.stdout and "no" in res.stdout


@needs_libtpu
def test_unknown_topology_is_one_readable_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "experiments.aot", "--preset", "tiny", "--topology", "v9-1"],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and "known topologies" in res.stderr


def test_pallas_calls_leave_out_the_tpu_compilers_own_custom_calls():
    hlo = """
  %flash_fwd_tpu.2 = (f32[6,4,128,16]{3,2,1,0}, f32[6,4,128,1]{3,2,1,0}) custom-call(%a, %b), custom_call_target="tpu_custom_call"
  %online-softmax.1 = f32[16,2,256,16]{3,2,1,0} custom-call(%c, %d), custom_call_target="tpu_custom_call", frontend_attributes={tiling="256,256"}
  ROOT %decode_attention_tpu = f32[16,2,8,16]{3,2,1,0} custom-call(%e), custom_call_target="tpu_custom_call"
  %sort = f32[8]{0} custom-call(%f), custom_call_target="Sort"
"""
    assert pallas_calls(hlo) == 2


def test_collectives_are_counted_with_their_result_bytes():
    hlo = "\n".join([
        "  %all-gather.1 = bf16[8,1024]{1,0} all-gather(bf16[1,1024]{1,0} %p), dimensions={0}",
        "  %ar = (f32[16]{0}, f32[4,4]{1,0}) all-reduce(f32[16]{0} %a, f32[4,4]{1,0} %b), to_apply=%add",
        "  %ags = (bf16[2]{0}, bf16[16]{0}) all-gather-start(bf16[2]{0} %x)",
        "  %add.3 = f32[16]{0} add(f32[16]{0} %a, f32[16]{0} %b)",
    ])
    c = collectives(hlo)
    assert c["all-gather"] == {"count": 2, "bytes": 8 * 1024 * 2 + (2 + 16) * 2}
    assert c["all-reduce"] == {"count": 1, "bytes": 16 * 4 + 16 * 4}
    assert c["reduce-scatter"] == {"count": 0, "bytes": 0}


def test_a_collective_split_into_a_chain_of_fusions_counts_once():
    # As the TPU compiler writes an all-gather it overlaps with compute: each link of the chain
    # names the whole result ([32,64] bf16 = 4 KiB) and fills a piece of it.
    link = ('  %all-gather.{} = bf16[32,64]{{1,0}} all-gather(bf16[4,64]{{1,0}} %param_0.{}), dimensions={{0}}, '
            'frontend_attributes={{chain_id="{}"}}')
    hlo = "\n".join([link.format(1, 1, 6), link.format(2, 2, 6), link.format(3, 3, 6), link.format(4, 4, 7),
                     "  %all-gather.9 = bf16[8,8]{1,0} all-gather(bf16[1,8]{1,0} %p), dimensions={0}"])
    assert collectives(hlo)["all-gather"] == {"count": 3, "bytes": 2 * 32 * 64 * 2 + 8 * 8 * 2}


@needs_libtpu
def test_suggest_names_the_first_setting_that_fits(tmp_path):
    res, rows = _aot(tmp_path, "v5e-4", "--programs", "reference_logps", "--set", "dpo.ref_batch_size=8192",
                     "--set", "dpo.max_len=4096", "--suggest")
    assert res.returncode == 1  # the program as asked still does not fit
    (row,) = rows
    sug = row["suggestion"]
    assert not row["fits"] and sug["set"] is not None and sug["margin_bytes"] > 0
    assert [t["fits"] for t in sug["tried"]][-1] and not any(t["fits"] for t in sug["tried"][:-1])
    sizes = [int(t["set"][0].split("=")[1]) for t in sug["tried"]]
    assert sizes == [4096 >> i for i in range(len(sizes))]  # halved each time, first fit kept
    assert f"reference_logps fits with --set {sug['set'][0]}" in res.stdout


def test_candidate_settings_keep_the_batch_divisible():
    import dataclasses

    from experiments.aot import candidate_settings
    from experiments.configs import get_preset, resolve

    cfg = resolve(get_preset("tiny", "meta_reward"))
    cfg = dataclasses.replace(cfg, dpo=dataclasses.replace(cfg.dpo, batch_size=8, ref_batch_size=12))
    mesh = type("M", (), {"shape": {"data": 1, "fsdp": 2, "tensor": 1}})()
    assert candidate_settings("dpo_step", cfg, mesh) == [["dpo.train.windowed_einsum=false"], ["dpo.train.grad_accum_steps=2"],
                                                         ["dpo.train.grad_accum_steps=4"], ["remat=true"]]
    no_we = dataclasses.replace(cfg, dpo=dataclasses.replace(cfg.dpo, train=cfg.dpo.train.replace(windowed_einsum=False)))
    assert candidate_settings("dpo_step", no_we, mesh)[0] == ["dpo.train.grad_accum_steps=2"]
    assert candidate_settings("reference_logps", cfg, mesh) == [["dpo.ref_batch_size=6"]]  # 3 is not a multiple of 2


def notebook_settings(backend: str, n_dev: int) -> tuple[str, list[str]]:
    """The preset and ``--set`` overrides the Colab notebook picks on ``n_dev`` devices of ``backend``:
    its own settings cell, run with a stand-in for ``jax`` that reports that backend."""
    cells = ["".join(c["source"]) for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]
    (cell,) = [c for c in cells if "jax.default_backend()" in c]
    fake_jax = types.SimpleNamespace(default_backend=lambda: backend, device_count=lambda: n_dev,
                                     devices=lambda: [types.SimpleNamespace(device_kind=f"{backend} device")] * n_dev)
    ns = {"PRESET": "auto"}
    with mock.patch.dict(sys.modules, {"jax": fake_jax}):
        exec(cell, ns)
    return ns["PRESET"], ns["overrides"]


def test_notebook_settings_are_read_from_its_cell():
    assert notebook_settings("cpu", 1) == ("smollm2_cpu", [])
    preset, overrides = notebook_settings("tpu", 1)
    assert preset == "smollm2_cpu" and "dtype=bfloat16" in overrides and "dpo.batch_size=8" in overrides


@needs_libtpu
def test_the_notebooks_tpu_settings_fit_one_v5e_chip(tmp_path):
    """Colab's TPU runtime is one v5e chip: the notebook's DPO step, the largest of its training
    programs (13.7 of 16 GiB; the reference pass 3.7, SFT 8.2), compiles for it and fits. The
    other two are left to ``make aot``-style runs: each SmolLM2 compile takes minutes on 2 cores."""
    preset, overrides = notebook_settings("tpu", 1)
    res, rows = _aot(tmp_path, "v5e-1", "--programs", "dpo_step", *[a for o in overrides for a in ("--set", o)],
                     preset=preset)
    assert res.returncode == 0, res.stderr[-3000:]
    (row,) = rows
    assert row["program"] == "dpo_step" and row["compiled"] and row["fits"] and row["chips"] == 1
    assert 0 < row["total_bytes"] < row["hbm_bytes"]


@needs_libtpu
def test_the_windowed_einsum_setting_reaches_the_tpu_compiler(tmp_path):
    # The option is passed by name to libtpu, which refuses names it does not know ("No such compile
    # option"): this compile fails if a libtpu release renames the flag.
    res, rows = _aot(tmp_path, "v5e-4", "--programs", "dpo_step", "--set", "dpo.train.windowed_einsum=false")
    assert res.returncode == 0, res.stderr[-3000:]
    assert rows[0]["compiled"] and rows[0]["fits"]
    code = ("from jax.experimental import topologies\n"
            "from models.sharding import compiler_options, make_mesh\n"
            "devs = topologies.get_topology_desc(platform='tpu', topology_name='v5e:2x2', chips_per_host_bounds=(2, 2, 1)).devices\n"
            "mesh = make_mesh('fsdp=4', devices=devs)\n"
            "print(compiler_options(mesh, windowed_einsum=False), compiler_options(mesh))\n")
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "{'xla_tpu_enable_windowed_einsum_for_all_gather': False} None", out.stderr[-2000:]
