"""sentence-transformers' side of `ragchat bench models`: the same model
directory, texts, batch sizes and thread count as our side, in one process that
lives through the whole comparison (so no measurement of ours follows the exit
of a process that just freed a gigabyte).

Protocol, one JSON object per line. The first line read:
  {"model_dir": ..., "threads": 2, "max_tokens": 256}
is answered with {"version": ...}. Each further line:
  {"texts": [...], "batch": 32, "seconds": 3.0}
is answered with {"rate": texts per second}, over at least `seconds` of
repeated encode calls after one warm-up call. End of input ends the process.

Run by the benchmark with the interpreter of scripts/setup-sentence-transformers.
"""

import json
import sys
import time


def main() -> None:
    cfg = json.loads(sys.stdin.readline())
    import torch

    torch.set_num_threads(int(cfg["threads"]))
    import sentence_transformers as st
    from sentence_transformers import SentenceTransformer, models

    # The directory holds the Hugging Face model (config, weights, tokenizer);
    # all-MiniLM-L6-v2 is mean pooling then L2 normalization.
    word = models.Transformer(cfg["model_dir"], max_seq_length=int(cfg["max_tokens"]))
    pool = models.Pooling(word.get_embedding_dimension(), "mean")
    model = SentenceTransformer(modules=[word, pool, models.Normalize()], device="cpu")
    model.eval()
    print(json.dumps({"version": f"sentence-transformers {st.__version__}, torch {torch.__version__}"}), flush=True)

    for line in sys.stdin:
        job = json.loads(line)
        texts, batch, seconds = job["texts"], int(job["batch"]), float(job["seconds"])

        def call(i):
            chunk = [texts[(i + j) % len(texts)] for j in range(batch)]
            model.encode(chunk, batch_size=batch, convert_to_numpy=True, show_progress_bar=False)

        with torch.inference_mode():
            call(0)  # warm-up
            done, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                call(done)
                done += batch
            rate = done / (time.perf_counter() - started)
        print(json.dumps({"rate": rate}), flush=True)


if __name__ == "__main__":
    main()
