"""IntruderMonitor: the counts it logs during training equal ``repair detect`` on checkpoints saved at those steps."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_model, tiny_llama

import repair
from repair.errors import RepairError


def trainer_for(out, steps: int, callbacks=(), lr: float = 5e-2):
    """A Trainer for a fresh r=4 LoRA on the tiny Llama, on random tokens (seeded): intruders appear fast."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                    target_modules=["q_proj", "v_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (64, 16), generator=gen).tolist()
    data = Dataset.from_list([{"input_ids": x, "labels": x} for x in ids])
    args = TrainingArguments(output_dir=str(out / "trainer"), max_steps=steps, per_device_train_batch_size=8,
                             learning_rate=lr, warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[],
                             seed=0, use_cpu=True, dataloader_num_workers=0)
    return Trainer(model=model, args=args, train_dataset=data, callbacks=list(callbacks))


def saver(out, every: int):
    from transformers import TrainerCallback

    class Save(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every == 0:
                model.save_pretrained(str(out / f"step-{state.global_step}"))

    return Save()


def recorder(seen: list):
    from transformers import TrainerCallback

    class Record(TrainerCallback):  # stands in for TensorBoard / W&B: whatever trainer.log reaches
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    return Record()


def test_logged_counts_equal_detect_on_the_checkpoints(tmp_path):
    base = save_model(tiny_llama(), tmp_path / "base")
    seen: list[dict] = []
    trainer = trainer_for(tmp_path, 6, [saver(tmp_path, 2), recorder(seen)])
    monitor = repair.IntruderMonitor(every=2, cache=False).attach(trainer)
    trainer.train()

    logged = {e["step"]: e for e in trainer.state.log_history if "intruders/total" in e}
    assert sorted(logged) == [0, 2, 4, 6]
    assert logged[0]["intruders/total"] == 0  # B = 0 at the start: W_tuned = W0
    for step in (2, 4, 6):
        report = repair.detect(base, tmp_path / f"step-{step}", cache=False, device="cpu")  # where training ran
        assert logged[step]["intruders/total"] == report.total_intruders, step
        for kind, summary in report.by_module_type.items():
            assert logged[step][f"intruders/{kind}"] == summary.intruders, (step, kind)
        at_step = next(h for h in monitor.history if h["step"] == step)
        assert at_step["matrices"] == {m.name: {"intruders": m.intruders, "sigma": [m.sigma[i] for i in m.intruders]}
                                       for m in report.matrices}
    assert logged[6]["intruders/total"] > 0  # the run does plant intruders: the comparison is not 0 == 0
    assert sum("intruders/total" in e for e in seen) == 4  # through trainer.log, to every callback
    monitor.write_history(tmp_path / "intruders.json")
    doc = json.loads((tmp_path / "intruders.json").read_text())
    assert [s["step"] for s in doc["steps"]] == [0, 2, 4, 6] and doc["top_k"] == 10


def test_stop_above_ends_training(tmp_path):
    trainer = trainer_for(tmp_path, 20)
    monitor = repair.IntruderMonitor(every=1, stop_above=0, cache=False)
    trainer.add_callback(monitor)  # not attached: counts go to log_history directly
    trainer.train()
    assert trainer.state.global_step < 20
    assert monitor.history[-1]["intruders/total"] > 0
    assert all(h["intruders/total"] == 0 for h in monitor.history[:-1])
    assert [e["step"] for e in trainer.state.log_history if "intruders/total" in e] == \
        [h["step"] for h in monitor.history]


def test_bad_monitor_options_fail_before_training():
    with pytest.raises(RepairError, match="every"):
        repair.IntruderMonitor(every=0)
    with pytest.raises(RepairError, match="^top_k: expected an integer"):
        repair.IntruderMonitor(top_k=0)
