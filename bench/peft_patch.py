"""The peer: peft's ``reduce_intruder_dimension`` as a whole process, for ``bench_patch.py``.

Loads BASE with transformers, the LoRA adapter with PEFT, reduces the intruders and saves the new
adapter, which is what ``repair patch --format adapter`` does in one command.

    python bench/peft_patch.py BASE_DIR ADAPTER_DIR OUT_DIR [--scale 0.75] [--top-k 10] [--epsilon 0.5] [--device cpu]
"""

from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base")
    ap.add_argument("adapter")
    ap.add_argument("out")
    ap.add_argument("--scale", type=float, default=0.75)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--epsilon", type=float, default=0.5)
    ap.add_argument("--device", default="cpu", help="where the model (and so peft's SVDs) lives: cpu or cuda")
    args = ap.parse_args()

    import torch
    from peft import PeftModel
    from peft.tuners.lora.intruders import reduce_intruder_dimension
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32, device_map=args.device)
    peft_model = PeftModel.from_pretrained(model, args.adapter)
    reduce_intruder_dimension(peft_model, top_k=args.top_k, threshold_epsilon=args.epsilon,
                              mitigation_lambda=args.scale, logging_sink=None)
    peft_model.save_pretrained(args.out, selected_adapters=["intruder_reduced"])


if __name__ == "__main__":
    main()
