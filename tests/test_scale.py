"""Past one GPU: the 70B profile's dry run and node table, the training engines (train.engine) and how the driver
starts them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from selfreward import dryrun
from selfreward.launch import ACCELERATE_CONFIG, ACCELERATE_CONFIGS, Nodes, launcher
from selfreward.run.config import Config, ConfigError, apply_overrides, load_config

REPO = Path(__file__).resolve().parents[1]
LLAMA70 = REPO / "configs" / "llama-3.1-70b-qlora.yaml"
GIB = dryrun.GIB


@pytest.fixture(scope="module")
def plan70():
    return dryrun.plan(load_config(LLAMA70))


def test_the_70b_profile_fits_8x80_and_2x48_at_the_smallest_and_not_one_24gb_card(plan70):
    config, real, counts = plan70.config, plan70.real_config, plan70.counts
    assert counts["total"] == 70_553_706_496  # Llama 3.1 70B's published size
    assert dryrun.node_problems(config, real, counts, 8, 80) == []
    assert dryrun.smallest_node(config, real, counts) == (2, 48)
    described = plan70.describe()
    assert "per GPU of a node of 8: fsdp over 8 processes" in described
    assert "smallest node it fits: 2 x 48 GB (--num-processes 2 -- --generation.tensor_parallel_size 2)" in described
    assert "1 x 24 GB: no: 00_sft needs" in described
    refused = r"not fit a node of 1 x 24 GB: 00_sft needs .* smallest node it fits: 2 x 48"
    with pytest.raises(ConfigError, match=refused):
        dryrun.check_node(plan70, 1, 24)
    with pytest.raises(ConfigError, match=r"tensor_parallel_size' is 8, more GPUs than the node's 2"):
        dryrun.check_node(plan70, 2, 48)  # it fits, but vLLM cannot span 8 GPUs there


def test_fsdp_shards_the_training_state_and_loading_holds_the_whole_4bit_copy(plan70):
    config, real, counts = plan70.config, plan70.real_config, plan70.counts
    rows = {n: {r.stage: r for r in dryrun.memory_rows(config, real, counts, n)} for n in (2, 8)}
    two, eight = rows[2]["05_dpo"], rows[8]["05_dpo"]
    whole = dryrun.weight_bytes(counts, "bfloat16", four_bit=True)  # every other weight in the compute dtype
    assert two.load == eight.load == whole
    assert two.trainable == 4 * eight.trainable == 16 * counts["lora"] // 2
    assert whole // 8 < eight.weights < whole // 2 < two.weights  # a share, plus the blocks being gathered
    assert two.gpu <= 48 * dryrun.GB and eight.gpu == whole + dryrun.GPU_OVERHEAD  # loading is the peak on 8
    ddp = apply_overrides(config, {"train.engine": "ddp"}, "test")
    copied = {r.stage: r for r in dryrun.memory_rows(ddp, real, counts, 8)}["05_dpo"]
    assert copied.weights > whole and copied.trainable == 16 * counts["lora"]  # every GPU holds it all
    vllm = rows[2]["01-03, 06"]  # fp8: one byte per weight of the linear layers, split over the 2 GPUs
    assert vllm.weights == (counts["linear"] + 2 * (counts["total"] - counts["linear"])) // 2
    assert not {"01_gen_prompts", "06_eval"} & set(rows[2])  # the hf backend's one-GPU rows do not apply


def test_a_dry_run_on_this_cpu_trains_without_fsdp_on_one_engine_and_cuts_new_tokens(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(dryrun, "stand_in", lambda name: Path("/nonexistent/stand-in"))
    dry = dryrun.dry_config(load_config(LLAMA70))
    assert dry.train.engine == "ddp" and dry.generation.tensor_parallel_size == 1
    assert dry.responses.max_new_tokens == dry.eval.max_new_tokens == dryrun.DRY_NEW_TOKENS
    assert dry.generation.quantization == "fp8"  # the hf backend says it generates in model.dtype
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    on_gpus = dryrun.dry_config(load_config(LLAMA70))
    assert on_gpus.train.engine == "fsdp" and on_gpus.generation.tensor_parallel_size == 2


def test_the_driver_refuses_the_70b_profile_on_one_24gb_card_before_any_stage(tmp_path, cache):
    from conftest import stage_env

    run = tmp_path / "run"
    proc = subprocess.run(
        ["bash", str(REPO / "self-reward.sh"), "--config", str(LLAMA70), "--dry-run", "--run-dir", str(run),
         "--gpu-memory", "24"],
        cwd=REPO, env=stage_env(cache), capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "does not fit a node of 1 x 24 GB: 00_sft needs" in proc.stderr
    assert "the smallest node it fits: 2 x 48 GB" in proc.stderr
    assert "fits: 2 x 48 GB" in proc.stdout and not (run / "M0").exists()


def test_each_engine_starts_the_training_stages_its_own_way():
    assert launcher("ddp", 1) == []  # one plain process, as before
    assert launcher("ddp", 2, python="py")[2:] == ["torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    fsdp = launcher("fsdp", 8, python="py")
    assert fsdp[:3] == ["py", "-m", "accelerate.commands.launch"]
    assert fsdp[fsdp.index("--config_file") + 1] == str(ACCELERATE_CONFIGS / "fsdp.yaml")
    assert fsdp[fsdp.index("--num_processes") + 1] == "8"
    two = launcher("deepspeed", 4, Nodes(2, 1, "10.0.0.1", 29400), python="py")
    assert two[two.index("--config_file") + 1].endswith("zero3.yaml")
    for flag, value in [("--num_processes", "8"), ("--num_machines", "2"), ("--machine_rank", "1"),
                        ("--main_process_ip", "10.0.0.1"), ("--main_process_port", "29400")]:  # fmt: skip
        assert two[two.index(flag) + 1] == value
    ddp_nodes = launcher("ddp", 1, Nodes(2, 1, "10.0.0.1", 29400), python="py")
    assert "--standalone" not in ddp_nodes and ddp_nodes[ddp_nodes.index("--node_rank") + 1] == "1"
    for name in ACCELERATE_CONFIG.values():
        assert (ACCELERATE_CONFIGS / name).is_file()


def test_accelerate_launch_starts_every_process_with_the_fsdp_config_here(tmp_path):
    """The launcher's command and configs/accelerate/fsdp.yaml start N processes on this CPU with accelerate's FSDP
    settings in their environment, as the Trainer reads them. (Training itself under FSDP needs a GPU: accelerate's
    FSDP plugin refuses a machine without one.)"""
    script = tmp_path / "env.py"
    script.write_text(
        "import os\nprint(os.environ['RANK'], os.environ['WORLD_SIZE'], os.environ.get('ACCELERATE_USE_FSDP'),"
        " os.environ.get('FSDP_SHARDING_STRATEGY'), os.environ.get('FSDP_CPU_RAM_EFFICIENT_LOADING'))\n"
    )
    proc = subprocess.run(
        [*launcher("fsdp", 2), str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = sorted(line for line in proc.stdout.splitlines() if line[:1].isdigit())
    assert lines == ["0 2 true FULL_SHARD true", "1 2 true FULL_SHARD true"]


def test_launch_prints_the_engines_launcher_and_the_dry_runs(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("train:\n  engine: fsdp\nmodel:\n  device: cpu\n")

    def words(*args):
        return subprocess.run(
            [sys.executable, "-m", "selfreward.launch", "--config", str(config), *args],
            cwd=REPO, capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip

    assert "accelerate.commands.launch" in words("--processes", "2")
    assert words("--processes", "2", "--dry-run")[2:] == "torch.distributed.run --standalone --nproc_per_node 2".split()
    assert words("--processes", "1", "--dry-run") == []  # no GPU here: the dry run trains as one plain process


def test_a_sharded_engine_started_without_its_launcher_is_refused(monkeypatch):
    from selfreward.model.training import check_engine_launch

    config = apply_overrides(Config(), {"train.engine": "fsdp"}, "test")
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    with pytest.raises(ConfigError, match=r"train.engine' is fsdp.*launch with configs/accelerate/fsdp.yaml"):
        check_engine_launch(config)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    check_engine_launch(config)
    check_engine_launch(Config())  # ddp: torchrun, or one plain process


def test_fsdp_qlora_holds_every_weight_in_the_compute_dtype_so_fsdp_can_shard_it(tiny_model, tmp_path, monkeypatch):
    """Under train.engine fsdp the 4-bit weights are packed in bfloat16 (bnb_4bit_quant_storage), every other weight
    and the adapter are bfloat16 too: FSDP flattens a unit's parameters into one tensor of one dtype. Under ddp the
    same model trains its adapter in float32 (peft casts the rest to float32)."""
    import torch

    from selfreward.model.training import build_sft_trainer

    _, chat, path = tiny_model
    rows = [{"prompt": chat.prompt("Name a colour."), "completion": chat.completion("Red.")}]
    settings = {"model.name_or_path": path, "model.device": "cpu", "model.load_in_4bit": True}
    sharded = apply_overrides(Config(), {**settings, "train.engine": "fsdp"}, "test")
    trainer = build_sft_trainer(path, rows, sharded, tmp_path / "fsdp")
    four_bit = [p for p in trainer.model.parameters() if getattr(p, "quant_state", None) is not None]
    assert four_bit and {p.dtype for p in four_bit} == {torch.bfloat16}  # the packed storage
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}
    assert trainer.args.gradient_checkpointing_kwargs in (None, {"use_reentrant": True})
    ddp = apply_overrides(Config(), settings, "test")
    trainer = build_sft_trainer(path, rows, ddp, tmp_path / "ddp")
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.float32}


def test_the_new_keys_leave_a_finished_run_finished_until_they_are_set():
    """train.engine and generation.quantization came after runs were made: at their defaults no stage's
    fingerprint sees them; set, they redo only the stages they change."""
    from selfreward.run.stages import STAGES, fingerprinted_config
    from selfreward.stage import unused_override

    default = Config()
    fsdp = apply_overrides(default, {"train.engine": "fsdp"}, "test")
    fp8 = apply_overrides(default, {"generation.quantization": "fp8"}, "test")
    for stage in STAGES:
        used = fingerprinted_config(stage.name, default)
        assert "train.engine" not in used and "quantization" not in used.get("generation", {}), stage.name
        assert (fingerprinted_config(stage.name, fsdp) != used) == bool(stage.trains), stage.name
        assert (fingerprinted_config(stage.name, fp8) != used) == bool(stage.generates), stage.name
    assert unused_override("05_dpo", "train.engine") is None
    assert "does not apply to 02_gen_responses" in unused_override("02_gen_responses", "train.engine")


def test_a_real_run_is_refused_at_once_on_a_host_without_the_merges_ram(tmp_path, cache):
    """Each merge loads the 70B parent in bfloat16 on the host (about 145 GiB): the driver refuses a host with
    less free RAM before any stage starts, not stage 00 after its model has loaded."""
    from conftest import stage_env

    from selfreward.model.models import available_host_ram

    if (available_host_ram() or 0) > 160 * GIB:
        pytest.skip("this host has the RAM a 70B merge needs")
    run = tmp_path / "run"
    proc = subprocess.run(
        ["bash", str(REPO / "self-reward.sh"), "--config", str(LLAMA70), "--run-dir", str(run), "--no-oxen"],
        cwd=REPO, env=stage_env(cache), capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "merging each adapter loads meta-llama/Llama-3.1-70B-Instruct in bfloat16 on the host" in proc.stderr
    assert "about 144.6 GiB of RAM" in proc.stderr and not (run / "M0").exists()
