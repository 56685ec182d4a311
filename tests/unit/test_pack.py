"""Packing: the packed loss equals the unpacked token mean, samples never attend to each other
(checked on logits, with a leaking configuration as the negative control), packs are deterministic."""
import random

import pytest
import torch

from rosa_ds.recipe.data import BatchOrder, PackCollator, PackedSplit, PadCollator, TokenizedSplit, batch_tokens
from rosa_ds.recipe.data.pack import check_packed_attention, pack_samples, prepare_packed_model
from tests.helpers.models import tiny_model

VOCAB = 96


def split(seed=0, n=12, text_mode=False):
    """Variable-length samples; prompt/target labels (first 2 tokens masked) or plain text labels."""
    rng = random.Random(seed)
    ids = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(3, 14))] for _ in range(n)]
    labels = [list(x) if text_mode else [-100] * 2 + x[2:] for x in ids]
    return TokenizedSplit.from_lists(ids, labels)


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama", seed=0, hidden=32, intermediate=64, positions=64, vocab=VOCAB, pad_token_id=0)
    return model.float().eval()


def test_pack_samples_fill_rows_once_and_deterministically():
    rng = random.Random(3)
    lengths = [rng.randint(1, 30) for _ in range(200)]
    packs = pack_samples(lengths, 32)
    assert sorted(i for p in packs for i in p) == list(range(200))  # every sample exactly once
    assert all(sum(lengths[i] for i in p) <= 32 for p in packs)
    assert packs == pack_samples(lengths, 32)
    small = [rng.randint(1, 12) for _ in range(200)]  # short samples: rows come out nearly full
    assert len(pack_samples(small, 32)) <= -(-sum(small) // 32) + 1
    assert pack_samples([5, 3, 4, 2], 7) == [[0, 3], [1, 2]]  # 5+2, 4+3: hand-computed


@pytest.mark.parametrize("text_mode", [False, True])
def test_packed_loss_equals_unpacked_token_mean(llama, text_mode):
    prepare_packed_model(llama, "cpu")
    data = split(1, text_mode=text_mode)
    packed = PackedSplit(data, seq_len=24)
    assert len(packed) < len(data)
    rows = [packed[i] for i in range(len(packed))]
    batch = PackCollator(0)(rows)
    assert batch_tokens(batch) == int(data.lengths().sum()) and "num_tokens" not in batch
    with torch.no_grad():
        loss_packed = llama(**batch).loss.double()
        per_sample = [llama(**PadCollator(0)([data[i]])) for i in range(len(data))]
        counts = [int((data[i]["labels"][1:] != -100).sum()) for i in range(len(data))]
        mean = sum(o.loss.double() * n for o, n in zip(per_sample, counts)) / sum(counts)
        loss_padded = llama(**PadCollator(0)([data[i] for i in range(len(data))])).loss.double()
    assert abs(loss_packed - mean) / mean <= 1e-5, (loss_packed, mean)
    assert abs(loss_padded - mean) / mean <= 1e-5  # the trainer's unpacked loss is the same token mean


def test_no_attention_across_samples_and_leak_is_caught():
    model = tiny_model("llama", seed=1, hidden=32, intermediate=64, positions=64, vocab=VOCAB).eval()
    data = split(2)
    packed = PackedSplit(data, seq_len=40)
    batch = PackCollator(0)([packed[i] for i in range(len(packed))])
    batch.pop("num_tokens")

    def per_sample_gap():
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
            gap = 0.0
            for row, pack in enumerate(packed.packs):
                at = 0
                for i in pack:
                    alone = model(input_ids=data[i]["input_ids"][None]).logits[0]
                    n = len(alone)
                    gap = max(gap, float((logits[row, at:at + n] - alone).abs().max()))
                    at += n
        return gap

    # transformers' default (use_cache=True) skips packed-sequence detection: samples see each other
    assert per_sample_gap() > 1e-2
    with pytest.raises(ValueError, match=r"^--pack: with attention 'sdpa' this model lets packed samples attend"):
        check_packed_attention(model, "cpu")
    assert prepare_packed_model(model, "cpu") <= 1e-6
    assert per_sample_gap() <= 1e-5  # every sample's logits in the packed row equal its logits alone


def test_refuses_attention_that_cannot_separate():
    model = tiny_model("llama", seed=0, vocab=VOCAB)
    model.config._attn_implementation = "paged_attention"
    with pytest.raises(ValueError, match=r"^--pack needs an attention implementation .* this model uses "
                                         r"'paged_attention'; fix: drop --pack$"):
        check_packed_attention(model, "cpu")


def test_packed_order_resumes_mid_epoch():
    packed = PackedSplit(split(4, n=40), seq_len=24)
    order = BatchOrder(len(packed), micro_batch=2, world_size=1, seed=5)
    assert order.micro_batches(1, skip_batches=2) == order.micro_batches(1)[2:]
    first = [PackCollator(0)([packed[i] for i in b])["input_ids"] for b in order.micro_batches(1)]
    again = [PackCollator(0)([packed[i] for i in b])["input_ids"] for b in order.micro_batches(1)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
