import copy
import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from nanochat import speedrun
from nanochat.chat_format import render_for_completion
from nanochat.checkpoint import read_meta
from nanochat.cli import main as nanochat_main
from nanochat.config import (
    MIDTRAIN_PRESETS,
    PRESETS,
    RL_PRESETS,
    SFT_PRESETS,
    TOKENIZER_PRESETS,
    TokenizerTrainConfig,
    run_dir,
)
from nanochat.engine import Engine, Sampling
from nanochat.runs import latest, load_stage_model
from nanochat.runtime import init_runtime

RT = init_runtime(device="cpu", dtype="float32")


@pytest.mark.slow
def test_tiny_speedrun_runs_every_built_stage_then_skips_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_HOME", str(tmp_path))
    tiny = copy.deepcopy(PRESETS["tiny"])
    tiny.max_steps, tiny.eval_every, tiny.save_every, tiny.eval_tokens = 6, 3, 3, 8192
    monkeypatch.setitem(PRESETS, "tiny", tiny)  # the real preset, shortened
    monkeypatch.setitem(TOKENIZER_PRESETS, "tiny", TokenizerTrainConfig(name="tiny", vocab_size=1024))
    for presets in (MIDTRAIN_PRESETS, SFT_PRESETS):
        monkeypatch.setitem(presets, "tiny", dataclasses.replace(presets["tiny"], max_steps=3))
    monkeypatch.setitem(RL_PRESETS, "tiny", dataclasses.replace(RL_PRESETS["tiny"], max_steps=2, prompts_per_step=2,
                                                                samples=4, micro_batch=8, eval_items=4))

    assert speedrun.cli(["--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "| tiny | 1,024 |" in out  # the tokenizer eval table, against cl100k/o200k
    assert "cl100k_base" in out and "o200k_base" in out
    assert "nanochat chat --run tiny" in out and "nanochat serve --run tiny" in out
    assert "chat model: " + str(tmp_path / "runs" / "tiny" / "rl" / "checkpoints") in out  # what chat loads
    summary = json.loads((run_dir("tiny") / "speedrun.json").read_text())
    status = {s["stage"]: s["status"] for s in summary["stages"]}
    assert all(status[s] == "done" for s in ("tokenizer train", "pretrain", "midtrain", "sft", "rl", "eval",
                                             "report"))
    assert "validation bits per byte" in out
    assert "closes its turn on" in out  # the chat stages' held-out checks ran
    report = (run_dir("tiny") / "report.md").read_text()
    assert "| base | 6 |" in report and "bpb " in report  # measured numbers, from this run
    stage_table = report.split("## Stages")[1].split("##")[0]
    stage_rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in stage_table.splitlines()
                  if line.startswith(("| base |", "| mid |", "| sft |", "| rl |"))}
    for stage in ("base", "mid", "sft", "rl"):  # steps, parameters, data, wall-clock, tok/s: all measured
        assert all(cell.strip() != "—" for cell in stage_rows[stage][1:6]), stage_rows[stage]
    assert " tokens)" in stage_rows["sft"][3]  # sequences, and the token positions they filled
    assert "16 completions" in stage_rows["rl"][3]  # 2 steps × 2 questions × 4 samples
    # RL's held-out pass@1 and pass@4, once in the report: `nanochat eval` measured the SFT and RL checkpoints
    # again, with RL's settings, and got exactly what RL measured before its first step and after its last
    assert report.count("| arithmetic_pass@1 (sampled, held-out) | — | — | ") == 1
    rl_meta = read_meta(latest("tiny", "rl"), verify=False)
    for stage, prefix in (("sft", "before_"), ("rl", "")):
        measured = json.loads((run_dir("tiny") / "eval" / f"{stage}.json").read_text())
        assert {k: measured[k] for k in ("arithmetic_pass@1", "arithmetic_pass@4")} == \
            {k: rl_meta[prefix + k] for k in ("arithmetic_pass@1", "arithmetic_pass@4")}
    assert "MFU is shown where the device's peak FLOP/s is known" in report  # a CPU run has no MFU
    assert "| ChatCORE (centered) | — |" in report  # the chat evaluations of mid and sft, next to base's dash
    assert "| validation bpb (`nanochat eval`) | " in report
    sft_eval = json.loads((run_dir("tiny") / "eval" / "sft.json").read_text())
    details = sft_eval["details"]  # each task's counts beside the headline numbers the report shows
    assert set(details) == {"wiki_mc", "spelling", "arithmetic"} and all(d["total"] > 0 for d in details.values())
    assert sft_eval["chatcore"] == pytest.approx(sum(d["centered"] for d in details.values()) / 3)
    assert sft_eval["spelling"] == details["spelling"]["correct"] / details["spelling"]["total"]
    tok_stats = json.loads((run_dir("tiny") / "tokenizer.json").read_text())["tokenizers"]
    assert "## Tokenizer" in report and f"| tiny | 1,024 | {tok_stats[0]['tokens']:,} |" in report
    assert f"| cl100k_base | {tok_stats[1]['vocab_size']:,} | {tok_stats[1]['tokens']:,} |" in report
    for plot in ("pretrain_loss.png", "val_bpb.png", "chat_loss.png", "rl_reward.png"):
        assert f"]({plot})" in report
        assert (run_dir("tiny") / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    first = {s["stage"]: s["seconds"] for s in summary["stages"]}
    assert speedrun.cli(["--preset", "tiny"]) == 0  # a re-run skips what is finished, keeping its time
    out = capsys.readouterr().out
    stages = json.loads((run_dir("tiny") / "speedrun.json").read_text())["stages"]
    finished = ("tokenizer train", "pretrain", "midtrain", "sft", "rl")
    assert {s["stage"]: (s["status"], s["seconds"]) for s in stages if s["stage"] in finished} == \
        {name: ("done earlier", first[name]) for name in finished}
    assert first["pretrain"] > 0
    assert "already finished" in out
    report = (run_dir("tiny") / "report.md").read_text()
    assert f"| pretrain | done earlier | {first['pretrain']:.1f} |" in report

    # the trained chat model, exported for transformers, computes what ours does (issue 20)
    assert nanochat_main(["export", "--run", "tiny", "--out", str(tmp_path / "hf")]) == 0
    model, tok, _ = load_stage_model("tiny", "rl", RT)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    prompt = render_for_completion(tok, [{"role": "user", "content": "What is 12 plus 30? And who are you?"}])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=torch.tensor([prompt])).logits, model(torch.tensor([prompt])),
                                   atol=1e-4, rtol=0)
        ((ours, chosen),) = Engine(model, tok, RT).rollout([prompt], Sampling(max_tokens=48, temperature=0))
        mine = ours[:chosen.index(False)] if False in chosen else ours  # up to a calculator result it forced
        theirs = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=len(mine))[0, len(prompt):]
    assert len(mine) > 0 and theirs.tolist() == mine
