"""GSM8K through lm-eval against lit-peft's own exact match, on the same problems.

SmolLM2-135M-Instruct as shipped (no fine-tuning), or a fine-tuned checkpoint (``--ckpt``), on the
first ``--rows`` GSM8K test problems:

- ``lit-peft``: lit-peft's own test loop (``GSM8KData`` + ``CausalLM``: zero-shot, instruction +
  question in the chat template, batched greedy generation, ``extract_answer``);
- ``lm-eval gsm8k_lit_peft``: the same prompt through lm-eval (``apply_chat_template``), lm-eval's
  generation loop and its strict-match / flexible-extract filters;
- ``lm-eval gsm8k_local`` (``--fewshot``): lm-eval's standard 5-shot GSM8K, for reference.

Per problem: identical generations, and agreement of correct / wrong between the scorings.

    python benchmarks/harness_gsm8k.py [--rows 100] [--max_new_tokens 192] [--fewshot] [--ckpt C --name N]

Writes ``benchmarks/results/<name>.md`` and ``.json`` (name: ``harness_gsm8k``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def lit_peft_generations(task, data, rows: int) -> list[dict]:
    from lit_peft.data.gsm8k import extract_answer

    data.setup("test")
    out = []
    task.eval()
    for batch in data.test_dataloader():
        for prompt, generation, reference in zip(batch["prompts"], task.generate(batch), batch["references"]):
            out.append({"prompt": prompt, "generation": generation, "reference": reference,
                        "correct": float(extract_answer(generation) == reference)})
    by_prompt = {r["prompt"]: r for r in out}  # batches run longest prompt first: back to file order
    return [by_prompt[r.prompt] for r in data.records["test"]][:rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data" / "gsm8k"))
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--max_new_tokens", type=int, default=192)
    parser.add_argument("--fewshot", action="store_true", help="also lm-eval's standard 5-shot gsm8k")
    parser.add_argument("--ckpt", help="a lit-peft checkpoint of SmolLM2 to score (default: the model as shipped)")
    parser.add_argument("--name", default="harness_gsm8k")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    from lit_peft.data import GSM8KData
    from lit_peft.harness import gsm8k_rescore, run_harness
    from lit_peft.tasks import CausalLM

    if args.ckpt:
        from lit_peft.export import load_checkpoint

        task = load_checkpoint(args.ckpt)
        task.generation["max_new_tokens"] = args.max_new_tokens
    else:
        task = CausalLM(backbone="smollm2", max_new_tokens=args.max_new_tokens)
        task.configure_model()
    data = GSM8KData(data_dir=args.data_dir, limit_eval_rows=args.rows, eval_batch_size=8, tokenizer="smollm2")
    results: dict = {"rows": args.rows, "max_new_tokens": args.max_new_tokens}
    started = time.time()
    with torch.no_grad():
        ours = lit_peft_generations(task, data, args.rows)
    results["lit_peft"] = {"exact_match": sum(r["correct"] for r in ours) / len(ours), "time_s": round(time.time() - started)}
    runs = [("gsm8k_lit_peft", dict(apply_chat_template=True, num_fewshot=0))]
    if args.fewshot:
        runs.append(("gsm8k_local", dict(apply_chat_template=False)))
    per_problem = {"lit_peft": ours}
    for name, options in runs:
        started = time.time()
        out = run_harness(task.backbone, task.tokenizer, [name], data_dirs={name: args.data_dir}, limit=args.rows,
                          batch_size=8, max_new_tokens=args.max_new_tokens, **options)
        rows = gsm8k_rescore(out["samples"][name])
        per_problem[name] = rows
        results[name] = {**{k.split(",")[0] + "_" + k.split(",")[1]: v for k, v in out["metrics"][name].items()
                            if "stderr" not in k},
                         "lit_peft_scoring_of_its_generations": sum(r["lit_peft"] for r in rows) / len(rows),
                         "time_s": round(time.time() - started)}
        if name == "gsm8k_lit_peft":
            same_text = [a["generation"].strip() == b["response"].strip() for a, b in zip(ours, rows)]
            same_prompt_q = [a["prompt"].split("\n\n", 1)[1].strip() == b["question"].strip() for a, b in zip(ours, rows)]
            results["agreement"] = {
                "same_problems": sum(same_prompt_q) / len(rows),
                "identical_generations": sum(same_text) / len(rows),
                "correct_agrees_strict": sum(a["correct"] == b["strict-match"] for a, b in zip(ours, rows)) / len(rows),
                "correct_agrees_flexible": sum(a["correct"] == b["flexible-extract"] for a, b in zip(ours, rows)) / len(rows),
                "correct_agrees_same_scoring": sum(a["correct"] == b["lit_peft"] for a, b in zip(ours, rows)) / len(rows),
                "differing_generations": [{"question": b["question"][:80], "lit_peft": a["generation"][:160],
                                           "lm_eval": b["response"][:160]}
                                          for a, b, s in zip(ours, rows, same_text) if not s][:5],
            }
    out_dir = Path(args.out)
    (out_dir / f"{args.name}.json").write_text(json.dumps({"summary": results, "per_problem": per_problem}, indent=2,
                                                           default=str) + "\n")
    model = f"the checkpoint {args.ckpt}" if args.ckpt else "SmolLM2-135M-Instruct (no fine-tuning)"
    lines = [f"{model}, the first {args.rows} GSM8K test problems, greedy, "
             f"{args.max_new_tokens} new tokens; CPU\n", "| scoring | exact match (%) | time (s) |", "|---|---|---|",
             f"| lit-peft test loop (extract_answer) | {100 * results['lit_peft']['exact_match']:.1f} | "
             f"{results['lit_peft']['time_s']} |"]
    for name, _ in runs:
        r = results[name]
        lines.append(f"| lm-eval {name}, strict-match | {100 * r['exact_match_strict-match']:.1f} | {r['time_s']} |")
        lines.append(f"| lm-eval {name}, flexible-extract | {100 * r['exact_match_flexible-extract']:.1f} | |")
        lines.append(f"| lit-peft's extract_answer on lm-eval {name}'s generations | "
                     f"{100 * r['lit_peft_scoring_of_its_generations']:.1f} | |")
    if "agreement" in results:
        a = results["agreement"]
        lines += ["", "Per problem, lit-peft's loop against lm-eval's gsm8k_lit_peft (same prompt):", "",
                  f"- identical generations: {100 * a['identical_generations']:.1f}%",
                  f"- correct/wrong agree, lit-peft's scoring on both: {100 * a['correct_agrees_same_scoring']:.1f}%",
                  f"- correct/wrong agree, lit-peft vs lm-eval strict-match: {100 * a['correct_agrees_strict']:.1f}%",
                  f"- correct/wrong agree, lit-peft vs lm-eval flexible-extract: {100 * a['correct_agrees_flexible']:.1f}%"]
    (out_dir / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
