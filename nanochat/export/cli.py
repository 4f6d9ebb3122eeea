"""`nanochat export`: write a run's model as a Hugging Face directory (`--format hf`) or a GGUF file
(`--format gguf`), with a generated model card."""

from __future__ import annotations

import json
from pathlib import Path

from nanochat.checkpoint import read_meta
from nanochat.config import ExportConfig, home, parse_config, run_dir
from nanochat.export.gguf import export_gguf
from nanochat.export.hf import choose_arch, export_hf
from nanochat.gpt import GPT
from nanochat.runs import STAGE_NAMES, find_model, latest, load_model
from nanochat.runtime import init_runtime, teardown


def model_card(model: GPT, name: str, path: Path, arch: str) -> str:
    """README.md of an export: what the model is, how it was trained, its scores, how to load it."""
    run = name.split("/")[0]
    cfg = model.config
    stages = []
    for stage in STAGE_NAMES:
        ckpt = latest(run, stage)
        if ckpt is not None:
            stage_meta = read_meta(ckpt, verify=False)
            config = stage_meta.get("config", {})
            data = config.get("tasks") or config.get("data") or "the preset's"
            stages.append(f"| {stage} | {stage_meta.get('step', '?')} | {data} |")
    scores = []
    for stage in STAGE_NAMES:
        file = run_dir(run) / "eval" / f"{stage}.json"
        if file.is_file():
            results = {k: v for k, v in json.loads(file.read_text()).items() if isinstance(v, float)}
            scores.append(f"| {stage} | " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()) + " |")
    remote = arch == "remote"
    load = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"model = AutoModelForCausalLM.from_pretrained(\"DIR\"{', trust_remote_code=True' if remote else ''})\n"
            f"tok = AutoTokenizer.from_pretrained(\"DIR\"{', trust_remote_code=True' if remote else ''})\n"
            "ids = tok.apply_chat_template([{\"role\": \"user\", \"content\": \"Hi!\"}], add_generation_prompt=True,\n"
            "                              return_tensors=\"pt\", return_dict=True)\n"
            "out = model.generate(**ids, max_new_tokens=64)\n"
            "print(tok.decode(out[0, ids[\"input_ids\"].shape[1]:], skip_special_tokens=True))")
    lines = [
        f"# nanochat model `{name}`", "",
        f"A {model.num_params():,}-parameter chat model trained from scratch with "
        "nanochat (pretraining, midtraining, SFT and, where run, RL), exported from "
        f"`{path}`.", "",
        "- Architecture: " + ("our own modeling file `modeling_nanochat.py` (load with `trust_remote_code=True`)."
                              if remote else f"transformers' `{arch}`, no remote code; computes what nanochat does."),
        f"- Shape: depth {cfg.depth}, width {cfg.n_embd}, {cfg.n_head} heads of {cfg.head_dim} "
        f"({cfg.kv_heads} key/value heads), {cfg.mlp} MLP, context {cfg.sequence_len} tokens in training.",
        f"- Tokenizer: byte-level BPE, {model.vocab_size:,} ids, nanochat's chat tokens "
        "(`<|user_start|>` … `<|assistant_end|>`); `apply_chat_template` renders nanochat's chat format.",
        "", "## Training", "", "| stage | steps | data |", "|---|---:|---|", *stages,
        "", "## Scores (`nanochat eval`)", "",
        *(["| stage | scores |", "|---|---|", *scores] if scores else ["Not evaluated: run `nanochat eval`."]),
        "", "## Use", "", "```python", load, "```", "",
        "The model may call a calculator (`<|python_start|>expr<|python_end|>`); nanochat's engine runs it and "
        "inserts `<|output_start|>result<|output_end|>`. transformers does not run tools: generation stops "
        "being meaningful after a tool call unless you insert the result yourself.",
        *(["", "Generation with the remote-code model recomputes the whole sequence each step (no KV cache)."]
          if remote else []),
        "", "Small models trained for minutes say wrong things with confidence; this one is for learning.", ""]
    return "\n".join(lines)


def cli(argv: list[str]) -> int:
    cfg = parse_config(ExportConfig, argv, prog="nanochat export", description=__doc__.split("\n\n")[0])
    src = cfg.source
    rt = init_runtime("cpu", "float32", seed=0)
    try:
        path, name = find_model(src.run, src.stage, src.checkpoint)
        model, tok, _ = load_model(path, rt)
        suffix = ".gguf" if cfg.format == "gguf" else ""
        default = home() / "exports" / f"{name.replace('/', '-')}-{cfg.format}{suffix}"
        out = Path(cfg.out).expanduser() if cfg.out else default
        if cfg.format == "hf":
            arch = choose_arch(model.config, cfg.arch)
            export_hf(model, tok, out, arch, card=model_card(model, name, path, arch))
            print(f"exported {name} ({path}) as a Hugging Face directory ({arch}) to {out}")
        else:
            export_gguf(model, tok, out)
    finally:
        teardown()
    return 0
