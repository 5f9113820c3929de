"""Perplexity cost of quantizing the output head in the lean runtime (fp32 model, 2 windows of 512 tokens)."""
import torch, math, slimlm
from slimlm.data import corpus_text
from slimlm.runtime.lean import LeanModel, RuntimeConfig
torch.set_num_threads(1)
lm = slimlm.load("smollm2-135m")
ids = lm.tokenizer(corpus_text("evaluation"), add_special_tokens=False)["input_ids"][:1024]
for hb, hg in [(0, 64), (8, 64), (4, 32)]:
    lean = LeanModel(lm.model, RuntimeConfig(head_bits=hb, head_group=hg, kernel="cpu"))
    nll, n = 0.0, 0
    for w in range(0, len(ids), 512):
        win = ids[w:w+512]; lean.reset()
        logits = lean.extend(win, all_logits=True)
        lp = torch.log_softmax(logits[:-1], -1)
        nll -= lp.gather(1, torch.tensor(win[1:]).unsqueeze(1)).sum().item(); n += len(win) - 1
    print(f"head_bits={hb} group={hg}: ppl {math.exp(nll/n):.4f} over {n} tokens, head MB/token {lean.head.nbytes()/1e6:.1f}", flush=True)
