"""gptfast.training / gptfast.checkpoints.training_state / gptfast train + eval: the loop, exact resume,
fine-tuning masks, the fused backend, config files, bad input. CPU, tiny models."""
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from gptfast.checkpoints import training_state as C
from gptfast.cli import main
from gptfast.config import GPTConfig
from gptfast.training.data import BatchSampler, DataError, load_dataset
from gptfast.training.mfu import flops_per_token, known_peak_tflops, mfu, resolve_peak_tflops
from gptfast.model import GPT
from gptfast.ops._dispatch import use_triton
from gptfast.testing import assert_error_ratio
from gptfast.tokenizer import ByteTokenizer
from gptfast.training.config import TrainConfig, load_config_file
from gptfast.training import build_optimizer, evaluate, lr_at, train
from gptfast.checkpoints.loader import load_model_and_tokenizer


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest single-threaded on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("token-cache"))


def config(tmp_path, cache_dir, **overrides) -> TrainConfig:
    """A 1-layer, 32-wide byte-level model on 60 KB of the standard library."""
    base = dict(
        model="tiny", n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=4, max_steps=6, lr=3e-3,
        warmup_steps=2, eval_interval=0, eval_batches=2, ckpt_interval=0, log_interval=1, corpus_max_bytes=60_000,
        cache_dir=cache_dir, out_dir=str(tmp_path / "run"), progress=False, sample_prompts=[], device="cpu", seed=0,
    )
    return TrainConfig.from_dict({**base, **overrides})


def run(cfg, stop_at=None):
    """Train; return (result, {step: loss})."""
    losses = {}

    def callback(info):
        losses[info.step] = info.loss
        return stop_at is not None and info.step >= stop_at

    return train(cfg, callback=callback), losses


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---- pieces -------------------------------------------------------------------------------


def test_lr_schedule_warms_up_then_follows_a_cosine_to_min_lr():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=14, lr_decay_steps=12)
    assert [lr_at(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(8, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert lr_at(12, cfg) == lr_at(13, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg) for s in range(3, 13)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert TrainConfig(lr=2e-3).final_lr == pytest.approx(2e-4)


def test_optimizer_decays_matrices_only():
    model = GPT(GPTConfig.from_preset("tiny", n_layer=1))
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} >= {"transformer.ln_f.weight", "transformer.h.0.attn.c_attn.bias"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_mfu_accounting():
    assert flops_per_token(1000, n_layer=2, n_embd=8, seq_len=16) == 6 * 1000 + 12 * 2 * 8 * 16
    assert known_peak_tflops("NVIDIA H200") == pytest.approx(989.4)
    assert known_peak_tflops("NVIDIA H100 PCIe") == 756.0 and known_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert known_peak_tflops("Some Other GPU") is None
    cpu = torch.device("cpu")
    assert resolve_peak_tflops("auto", cpu, torch.float32) is None  # n/a on CPU unless asked
    assert resolve_peak_tflops("off", cpu, torch.float32) is None
    assert resolve_peak_tflops("123.5", cpu, torch.float32) == 123.5
    assert resolve_peak_tflops("measured", cpu, torch.float32) > 0
    assert mfu(1e6, 1e6, peak_tflops=2.0, n_devices=1) == pytest.approx(0.5)
    assert mfu(1e6, 1e6, peak_tflops=None) is None


# ---- acceptance: learning, exact resume ------------------------------------------------------


def test_loss_falls_well_below_its_start_on_the_embedded_corpus(tmp_path, cache_dir):
    cfg = config(tmp_path, cache_dir, n_layer=2, n_embd=64, block_size=64, batch_size=16, max_steps=80, lr=5e-3,
                 warmup_steps=10, corpus_max_bytes=300_000, eval_batches=4, export=False)
    result, losses = run(cfg)
    start = losses[1]
    assert start > 5.0  # ~ln(256): the untrained model guesses bytes uniformly
    late = sum(losses[s] for s in range(71, 81)) / 10
    assert late < start - 2.0, f"training loss went from {start:.3f} to {late:.3f}"
    assert result.val_loss < 3.4 and result.history[-1][2] == result.val_loss


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, cache_dir):
    settings = dict(dropout=0.1, grad_accum=2, max_steps=6, eval_interval=2, ckpt_interval=3)
    full, full_losses = run(config(tmp_path / "a", cache_dir, **settings))

    first, first_losses = run(config(tmp_path / "b", cache_dir, **settings), stop_at=3)
    assert first.step == 3 and C.load_checkpoint(C.checkpoint_path(tmp_path / "b" / "run"))["step"] == 3
    resumed, resumed_losses = run(config(tmp_path / "b", cache_dir, resume=True, **settings))

    assert first_losses == {s: full_losses[s] for s in (1, 2, 3)}
    assert resumed_losses == {s: full_losses[s] for s in (4, 5, 6)}  # bit for bit, not approximately
    # History entries (step, loss, val_loss, ...) carry over; only the timings differ.
    assert [h[:3] for h in resumed.history] == [h[:3] for h in full.history]
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.val_loss == full.val_loss


# ---- fine-tuning ------------------------------------------------------------------------------


class EosTokenizer(ByteTokenizer):
    vocab_size = 257
    eos_token_id = 256


def test_finetune_loss_counts_completion_tokens_only(tmp_path):
    f = write_jsonl(tmp_path / "ft.jsonl", [{"prompt": "Q: 2+2?", "completion": " 4"}])
    ds = load_dataset(str(f), EosTokenizer())
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=257, block_size=16, n_layer=1, n_head=2, n_embd=32))
    x, y = ds.train.collate([0])
    prompt, completion = list(b"Q: 2+2?"), list(b" 4") + [256]
    assert x[0].tolist() == (prompt + completion)[:-1]

    logits = model(x)
    logits.retain_grad()
    # By hand: the completion tokens " ", "4", <eos> are predicted at the positions of
    # the last prompt token and the first two completion tokens.
    log_probs = torch.log_softmax(logits[0].double(), dim=-1)
    first = len(prompt) - 1
    hand = -sum(log_probs[first + i, tok] for i, tok in enumerate(completion)) / len(completion)
    _, loss = model(x, targets=y)
    assert loss.item() == pytest.approx(hand.item(), rel=1e-5)
    assert evaluate(model, ds.val, block_size=16).loss == pytest.approx(hand.item(), rel=1e-5)

    # Gradients reach the logits of completion positions only.
    F.cross_entropy(logits.view(-1, 257), y.view(-1), ignore_index=-100).backward()
    grad_norms = logits.grad[0].abs().sum(-1)
    assert (grad_norms[:first] == 0).all() and (grad_norms[first:] > 0).all()


def test_finetune_from_an_init_checkpoint(tmp_path, cache_dir):
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=256, block_size=48, n_layer=1, n_head=2, n_embd=32))
    base.save_pretrained(tmp_path / "base")
    records = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(6) for b in range(6)]
    data = write_jsonl(tmp_path / "sums.jsonl", records)
    cfg = config(tmp_path, cache_dir, init=str(tmp_path / "base"), data=str(data), n_layer=None, n_head=None,
                 n_embd=None, block_size=None, max_steps=30, lr=1e-2, eval_interval=30, batch_size=8)
    result, losses = run(cfg)
    assert result.model.config.block_size == 48  # the init model's context
    assert losses[30] < losses[1] - 1.0
    # The run directory is itself a model directory for the next --init, or for evaluation.
    reloaded = load_model_and_tokenizer(tmp_path / "run").model
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), result.model.state_dict().values()))


# ---- the fused backend ------------------------------------------------------------------------


@pytest.mark.skipif(not use_triton(torch.empty(0)), reason="needs the Triton kernels (CUDA, or TRITON_INTERPRET=1)")
def test_fused_backend_matches_reference_for_one_training_step(tmp_path, cache_dir):
    cfg = GPTConfig(vocab_size=256, block_size=24, n_layer=1, n_head=2, n_embd=32)
    text = tmp_path / "t.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 20)
    ds = load_dataset(str(text), ByteTokenizer(), cache_dir=cache_dir, progress=False)
    x, y = BatchSampler(ds.train, 2, 21, seed=0).next_batch()  # 21: not a multiple of any block size

    torch.manual_seed(0)
    models = {name: GPT(cfg, backend=name) for name in ("fused", "reference")}
    models["reference"].load_state_dict(models["fused"].state_dict())
    models["exact"] = GPT(cfg, backend="reference").double()
    models["exact"].load_state_dict(models["fused"].state_dict())
    losses, grads = {}, {}
    for name, model in models.items():
        _, loss = model(x, targets=y)
        loss.backward()
        losses[name] = loss.detach()
        grads[name] = {n: p.grad for n, p in model.named_parameters()}
    assert_error_ratio(losses["fused"], losses["reference"], losses["exact"], what="loss")
    torch.testing.assert_close(losses["fused"], losses["reference"], rtol=1e-5, atol=1e-6)
    for name, g in grads["fused"].items():
        assert_error_ratio(g, grads["reference"][name], grads["exact"][name], max_ratio=5.0, what=f"grad {name}")
        torch.testing.assert_close(g, grads["reference"][name], rtol=1e-4, atol=1e-6, msg=f"grad {name}")

    # The same through the training loop: the first step's loss on either backend.
    step_loss = {}
    for backend in ("fused", "reference"):
        run_cfg = config(tmp_path / backend, cache_dir, data=str(text), backend=backend, block_size=24, batch_size=2,
                         max_steps=1, eval_batches=1, export=False)
        result, losses_by_step = run(run_cfg)
        assert result.model.backend == backend
        step_loss[backend] = losses_by_step[1]
    assert step_loss["fused"] == pytest.approx(step_loss["reference"], rel=1e-5)


# ---- checkpoints and bad input ---------------------------------------------------------------


def test_interrupted_checkpoint_write_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    path = tmp_path / C.CHECKPOINT_NAME
    C.save_checkpoint(path, {"step": 1, "weights": torch.arange(4.0)})

    def crash_midway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        C.save_checkpoint(path, {"step": 2, "weights": torch.zeros(4)})
    monkeypatch.undo()
    state = C.load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["weights"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == [C.CHECKPOINT_NAME]  # no temp file left behind


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    garbage = tmp_path / "checkpoint.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(C.CheckpointMismatchError, match="not a readable gptfast checkpoint"):
        C.load_checkpoint(garbage)
    torch.save({"weights": torch.zeros(1)}, garbage)
    with pytest.raises(C.CheckpointMismatchError, match="not a gptfast training checkpoint"):
        C.load_checkpoint(garbage)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds neither a training checkpoint"):
        load_model_and_tokenizer(tmp_path / "empty")


def test_checkpoint_from_a_different_config_and_out_dir_misuse(tmp_path, cache_dir):
    run(config(tmp_path, cache_dir, max_steps=1, export=False))
    with pytest.raises(C.CheckpointMismatchError, match=r"n_embd: checkpoint 32 vs requested 48"):
        run(config(tmp_path, cache_dir, max_steps=2, n_embd=48, resume=True))
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        run(config(tmp_path, cache_dir, max_steps=2))
    with pytest.raises(FileNotFoundError, match="there is no checkpoint"):
        run(config(tmp_path / "fresh", cache_dir, resume=True))
    overwritten, _ = run(config(tmp_path, cache_dir, max_steps=1, n_embd=48, overwrite=True, export=False))
    assert overwritten.model.config.n_embd == 48


def test_context_longer_than_the_model_is_rejected(tmp_path, cache_dir):
    GPT(GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=32)).save_pretrained(tmp_path / "base")
    cfg = config(tmp_path, cache_dir, init=str(tmp_path / "base"), n_layer=None, n_head=None, n_embd=None, block_size=17)
    with pytest.raises(ValueError, match=r"block_size \(--block-size\) 17 is longer than the context of the model "
                                         r"in '.*base', 16 tokens"):
        train(cfg)
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "p" * 20, "completion": "c"}] * 2)
    with pytest.raises(DataError, match="longer than block_size 16"):
        train(cfg.replace(block_size=None, data=str(long)))
    with pytest.raises(ValueError, match=r"n_embd=64 cannot be changed"):
        train(cfg.replace(block_size=None, n_embd=64))


def test_bad_data_fails_before_training(tmp_path, cache_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="zero tokens"):
        train(config(tmp_path, cache_dir, data=str(empty)))
    broken = write_jsonl(tmp_path / "ft.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "only"}])
    with pytest.raises(DataError, match=r"ft.jsonl:2: missing string field\(s\) \['completion'\]"):
        train(config(tmp_path, cache_dir, data=str(broken)))
    with pytest.raises(DataError, match="does not exist"):
        train(config(tmp_path, cache_dir, data=str(tmp_path / "missing")))
    assert not (tmp_path / "run" / C.CHECKPOINT_NAME).exists()


def test_config_validation_names_the_setting():
    for bad, message in [
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(dtype="float16"), "use bfloat16"),
        (dict(lr=-1.0), "lr must be a positive number"),
        (dict(mfu_peak="fast"), "mfu_peak must be auto"),
        (dict(bogus=1), r"unknown training setting\(s\) \['bogus'\]"),
        (dict(batch_size="8"), "batch_size must be an integer"),
        (dict(backend="cuda"), "unknown backend"),
        (dict(resume=True, overwrite=True), "contradict"),
    ]:
        with pytest.raises(ValueError, match=message):
            TrainConfig.from_dict(bad)
    with pytest.raises(ValueError, match="unknown training preset"):
        TrainConfig.from_preset("huge")
    assert TrainConfig.from_preset("gpt2").model == "gpt2"


# ---- CLI ----------------------------------------------------------------------------------------


def test_config_files_and_flag_precedence(tmp_path, monkeypatch):
    from gptfast.cli import build_parser
    from gptfast.commands.train import config_from_args

    toml = tmp_path / "c.toml"
    toml.write_text('preset = "tiny"\nlr = 0.01\nbatch-size = 3\nsample_prompts = ["import "]\n')
    cfg = config_from_args(build_parser().parse_args(["train", "--config", str(toml), "--batch-size", "5"]))
    assert (cfg.lr, cfg.batch_size, cfg.block_size, cfg.sample_prompts) == (0.01, 5, 128, ["import "])
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("lr: 0.02\ncompile: true\nout_dir: elsewhere\n")
    cfg = config_from_args(build_parser().parse_args(["train", "--preset", "gpt2", "--config", str(yaml_file), "--no-compile"]))
    assert (cfg.model, cfg.lr, cfg.compile, cfg.out_dir) == ("gpt2", 0.02, False, "elsewhere")

    (tmp_path / "bad.toml").write_text("lr = [")
    with pytest.raises(ValueError, match="invalid TOML"):
        load_config_file(tmp_path / "bad.toml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        load_config_file(tmp_path / "list.yaml")
    with pytest.raises(ValueError, match="must end in .toml, .yaml or .yml"):
        load_config_file(toml.rename(tmp_path / "c.ini"))
    monkeypatch.setitem(sys.modules, "yaml", None)  # PyYAML not installed
    with pytest.raises(RuntimeError, match="needs PyYAML"):
        load_config_file(yaml_file)


def test_cli_train_then_eval(tmp_path, cache_dir, capsys, monkeypatch):
    # Samples go through gptfast.generate; its Python engine picks the C++ loop's tokens
    # without a compiler run (the extension has its own tests).
    monkeypatch.setenv("GPTFAST_NO_EXT", "1")
    out = tmp_path / "x"
    argv = ["train", "--preset", "tiny", "--max-steps", "3", "--out", str(out), "--cache-dir", cache_dir,
            "--corpus-max-bytes", "60000", "--block-size", "32", "--n-layer", "1", "--no-progress",
            "--sample-prompts", "def ", "--sample-tokens", "8", "--log-interval", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "step 3: val loss" in printed and "sample: 'def " in printed
    for name in (C.CHECKPOINT_NAME, "config.json", "model.safetensors", "train_config.json", "metrics.jsonl"):
        assert (out / name).exists(), name
    state = C.load_checkpoint(out / C.CHECKPOINT_NAME)
    exported = GPT.from_pretrained(str(out))
    for key, tensor in exported.state_dict().items():
        assert torch.equal(tensor, state["model"][key]), key
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]

    assert main(["eval", "--model", str(out), "--max-batches", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["split"] == "val" and math.isclose(result["perplexity"], math.exp(result["loss"]), rel_tol=1e-9)

    assert main(argv) == 2  # the run directory already holds a checkpoint
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "nothing.txt"), "--out", str(tmp_path / "y")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---- kills: stale temp files, metrics after the checkpoint -----------------------------------


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_save_removes_temp_files_of_killed_writers_only(tmp_path):
    import os

    stale = tmp_path / f".{C.CHECKPOINT_NAME}.{dead_pid()}.tmp"
    live = tmp_path / f".{C.CHECKPOINT_NAME}.{os.getppid()}.tmp"  # a live process may be mid-write
    for p in (stale, live):
        p.write_bytes(b"half a checkpoint")
    C.save_checkpoint(tmp_path / C.CHECKPOINT_NAME, {"step": 1})
    assert not stale.exists() and live.exists()
    assert C.load_checkpoint(tmp_path / C.CHECKPOINT_NAME)["step"] == 1


class Killed(Exception):
    pass


def test_resume_after_a_kill_has_no_duplicate_metrics_and_no_stale_temp_files(tmp_path, cache_dir):
    settings = dict(max_steps=6, ckpt_interval=3, export=False)

    def kill_at_5(info):
        if info.step == 5:
            raise Killed  # after step 5's metrics row, long after the checkpoint of step 3

    with pytest.raises(Killed):
        train(config(tmp_path, cache_dir, **settings), callback=kill_at_5)
    out = tmp_path / "run"
    metrics = out / "metrics.jsonl"
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4, 5]
    with open(metrics, "a") as f:
        f.write('{"step": 6, "lo')  # a row torn by the kill
    stale = out / f".{C.CHECKPOINT_NAME}.{dead_pid()}.tmp"
    stale.write_bytes(b"PK half a checkpoint")

    run(config(tmp_path, cache_dir, resume=True, **settings))
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    assert not stale.exists()
