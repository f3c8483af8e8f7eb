"""Tests for flax_minrnn.training.data: the embedded corpus, the character vocabulary
and dataset, the synthetic tasks (answers recomputed from the inputs), the
determinism contract and argument errors."""

import numpy as np
import pytest

from flax_minrnn.training.data import (SHAKESPEARE_SHA256, AssociativeRecall,
                              CharDataset, CharVocab, Parity, S5WordProblem,
                              SelectiveCopying,
                              load_text, make_task, sha256_of_text)

KEYS = ("inputs", "targets", "weights")


@pytest.fixture(scope="module")
def shakespeare():
    return load_text()


@pytest.fixture(scope="module")
def char_ds(shakespeare):
    return CharDataset(shakespeare, seq_len=64, batch_size=8, seed=3)


def assert_batches_equal(a, b):
    assert set(a) == set(b) == set(KEYS)
    for k in KEYS:
        assert a[k].dtype == b[k].dtype
        np.testing.assert_array_equal(a[k], b[k])


def rows(batch):
    """Yields (inputs, targets, weights) per sequence of a batch."""
    return zip(*(batch[k] for k in KEYS))


def check_format(batch, vocab_size, shape=None):
    assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
    assert batch["weights"].dtype == np.float32
    assert len({batch[k].shape for k in KEYS}) == 1
    if shape is not None:
        assert batch["inputs"].shape == shape
    for k in ("inputs", "targets"):
        assert batch[k].min() >= 0 and batch[k].max() < vocab_size
    assert batch["weights"].sum() > 0


# ---------------------------------------------------------------- corpus ---

def test_embedded_corpus(shakespeare):
    assert sha256_of_text(shakespeare) == SHAKESPEARE_SHA256
    assert len(shakespeare) == 1_115_394
    vocab = CharVocab.from_text(shakespeare)
    assert vocab.size == 65
    assert vocab.chars == "".join(sorted(set(shakespeare)))
    assert load_text("") == shakespeare


def test_load_text_local_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("héllo\r\nwörld\n".encode("utf-8"))
    assert load_text(path) == "héllo\r\nwörld\n"  # Exact: no \r\n mangling.
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_text(missing)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(ValueError, match="UTF-8"):
        load_text(bad)


# ----------------------------------------------------------------- vocab ---

def test_vocab_round_trip_and_json(shakespeare):
    vocab = CharVocab.from_text(shakespeare)
    sample = shakespeare[1000:3000]
    ids = vocab.encode(sample)
    assert ids.dtype == np.int32 and len(ids) == len(sample)
    assert vocab.decode(ids) == sample
    assert vocab.decode(list(ids)) == sample
    # Ids follow the sorted order of the characters.
    assert [vocab.encode(c)[0] for c in vocab.chars] == list(range(65))
    # A reload in a fresh process only sees the JSON string.
    reloaded = CharVocab.from_json(vocab.to_json())
    assert reloaded == vocab
    np.testing.assert_array_equal(reloaded.encode(sample), ids)
    # A non-sorted vocabulary keeps its order through JSON.
    odd = CharVocab("zaé")
    assert CharVocab.from_json(odd.to_json()).chars == "zaé"
    np.testing.assert_array_equal(odd.encode("éza"), [2, 0, 1])
    # Every character survives decoding: NUL (trailing too) and beyond the BMP.
    wide = CharVocab("a\x00\U0001F600")
    for text in ("a\x00a\x00", "\x00", "\U0001F600\x00a"):
        assert wide.decode(wide.encode(text)) == text


def test_vocab_errors():
    vocab = CharVocab.from_text("abc \n")
    with pytest.raises(ValueError,
                       match=r"'é' \(position 3\).*'ü' \(position 5\)"):
        vocab.encode("abcéaü")
    with pytest.raises(ValueError, match="in total"):
        vocab.encode("xxxxxxxx")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab.decode([0, 5])
    with pytest.raises(ValueError, match="distinct"):
        CharVocab("aa")
    with pytest.raises(ValueError, match="CharVocab"):
        CharVocab.from_json('{"chars": ["a"]}')
    assert vocab.decode([]) == ""


# ------------------------------------------------------------ char data ---

def test_split_sizes(char_ds):
    assert len(char_ds.train_data) == 1_003_854
    assert len(char_ds.val_data) == 111_540
    assert char_ds.vocab_size == 65


def test_char_targets_are_shifted_inputs(char_ds, shakespeare):
    batch = char_ds.train_batch(5)
    check_format(batch, 65, (8, 64))
    np.testing.assert_array_equal(batch["inputs"][:, 1:],
                                  batch["targets"][:, :-1])
    assert (batch["weights"] == 1).all()
    # Each row is a real window of the train split, and its target row
    # continues it by one character.
    train_text = shakespeare[:1_003_854]
    for inp, tgt in zip(batch["inputs"], batch["targets"]):
        window = char_ds.vocab.decode(inp) + char_ds.vocab.decode(tgt[-1:])
        assert window in train_text


def test_char_determinism(shakespeare, char_ds):
    batches = [char_ds.train_batch(s) for s in range(18)]
    assert_batches_equal(char_ds.train_batch(17), batches[17])
    fresh = CharDataset(shakespeare, seq_len=64, batch_size=8, seed=3)
    assert_batches_equal(fresh.train_batch(17), batches[17])
    assert not np.array_equal(batches[16]["inputs"], batches[17]["inputs"])
    other_seed = CharDataset(shakespeare, seq_len=64, batch_size=8, seed=4)
    assert not np.array_equal(other_seed.train_batch(17)["inputs"],
                              batches[17]["inputs"])


def test_char_eval_covers_validation_split(char_ds):
    batches = char_ds.eval_batches()
    for a, b in zip(batches, char_ds.eval_batches()):
        assert_batches_equal(a, b)
    for b in batches:
        check_format(b, 65, (8, 64))
    # Weighted targets, in order, are exactly val[1:]; inputs val[:-1].
    w = np.concatenate([b["weights"].reshape(-1) for b in batches]) > 0
    tgt = np.concatenate([b["targets"].reshape(-1) for b in batches])
    inp = np.concatenate([b["inputs"].reshape(-1) for b in batches])
    val = char_ds.val_data
    np.testing.assert_array_equal(tgt[w], val[1:])
    np.testing.assert_array_equal(inp[w], val[:-1])
    assert w.sum() == len(val) - 1
    assert len(batches) == -(-char_ds.num_eval_windows // 8)
    capped = char_ds.eval_batches(num_batches=2)
    assert len(capped) == 2
    assert_batches_equal(capped[1], batches[1])


def test_char_argument_errors():
    text = "abcdefghij" * 10
    with pytest.raises(ValueError, match="seq_len"):
        CharDataset(text, seq_len=0, batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        CharDataset(text, seq_len=4, batch_size=0)
    with pytest.raises(ValueError, match="seq_len=200"):
        CharDataset(text, seq_len=200, batch_size=2)
    with pytest.raises(ValueError, match="val_fraction"):
        CharDataset(text, seq_len=4, batch_size=2, val_fraction=1.0)
    with pytest.raises(ValueError, match="val_fraction"):
        CharDataset("abcdefghij", seq_len=4, batch_size=2, val_fraction=0.05)
    with pytest.raises(ValueError, match="seed"):
        CharDataset(text, seq_len=4, batch_size=2, seed=-1)
    # Seeds past 32 bits would repeat a smaller seed's jax.random.key.
    with pytest.raises(ValueError, match=r"seed must be < 2\*\*32"):
        CharDataset(text, seq_len=4, batch_size=2, seed=2 ** 32)
    assert CharDataset(text, seq_len=4, batch_size=2, seed=2 ** 32 - 1).seed == 2 ** 32 - 1
    ds = CharDataset(text, seq_len=4, batch_size=2)
    with pytest.raises(ValueError, match="step"):
        ds.train_batch(-1)
    with pytest.raises(ValueError, match="num_batches"):
        ds.eval_batches(0)


# -------------------------------------------------------------- synthetic ---

SMALL = {
    "selective_copying": dict(num_tokens_to_memorize=5, noise_length=20,
                              num_data_tokens=6, batch_size=16, seed=1),
    "parity": dict(min_len=1, max_len=8, batch_size=16, seed=1),
    "mqar": dict(num_kv_pairs=6, num_queries=4, num_keys=10, num_values=7,
                 batch_size=16, seed=1),
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_synthetic_determinism(name):
    task = make_task(name, **SMALL[name])
    batches = [task.train_batch(s) for s in range(18)]
    for b in batches:
        check_format(b, task.vocab_size, (16, task.seq_len))
    fresh = make_task(name, **SMALL[name])
    assert_batches_equal(fresh.train_batch(17), batches[17])
    assert not np.array_equal(batches[16]["inputs"], batches[17]["inputs"])
    reseeded = make_task(name, **{**SMALL[name], "seed": 2})
    assert not np.array_equal(reseeded.train_batch(17)["inputs"],
                              batches[17]["inputs"])
    evals = task.eval_batches(3)
    assert len(evals) == 3
    for a, b in zip(evals, fresh.eval_batches(3)):
        assert_batches_equal(a, b)
    # The eval stream is not the train stream.
    assert not np.array_equal(evals[0]["inputs"], batches[0]["inputs"])


def test_selective_copying_answers():
    K, N, V = 5, 20, 6
    task = SelectiveCopying(K, N, V, batch_size=64, seed=0)
    assert task.vocab_size == V + 2 and task.seq_len == N + 2 * K
    batches = [task.train_batch(0), task.train_batch(1)]
    for batch in batches + task.eval_batches(2):
        for inp, tgt, w in rows(batch):
            assert len(inp) == N + 2 * K
            markers = np.flatnonzero(inp == V + 1)
            np.testing.assert_array_equal(markers, np.arange(N + K, N + 2 * K))
            data = [t for t in inp if 1 <= t <= V]
            assert len(data) == K
            assert (inp[:N + K] <= V).all()
            np.testing.assert_array_equal(np.flatnonzero(w), markers)
            np.testing.assert_array_equal(tgt[w > 0], data)
            assert (tgt[w == 0] == 0).all()


def test_selective_copying_positions_vary():
    task = SelectiveCopying(4, 30, 8, batch_size=256, seed=0)
    inp = task.train_batch(0)["inputs"][:, :34]
    # Data tokens land in every position of the region, not a fixed pattern.
    assert ((inp > 0).sum(axis=0) > 0).all()


def parity_reference(inp):
    """Returns (query position, parity token, running targets) from inputs."""
    query = int(np.flatnonzero(inp == 3)[0])
    bits = [int(t) - 1 for t in inp[:query]]
    assert set(bits) <= {0, 1}
    assert (inp[query + 1:] == 0).all()
    running = np.cumsum(bits) % 2 + 1
    return query, sum(bits) % 2 + 1, running


def test_parity_answers():
    task = Parity(min_len=2, max_len=8, batch_size=64, seed=0)
    assert task.vocab_size == 4 and task.seq_len == 9
    assert (task.eval_min_len, task.eval_max_len) == (9, 16)
    lengths = []
    for batch in [task.train_batch(0), task.train_batch(1)]:
        for inp, tgt, w in rows(batch):
            q, answer, _ = parity_reference(inp)
            lengths.append(q)
            np.testing.assert_array_equal(np.flatnonzero(w), [q])
            assert tgt[q] == answer
    assert min(lengths) == 2 and max(lengths) == 8
    # Evaluation: longer strings, padded to eval_max_len + 1.
    eval_lengths = []
    for batch in task.eval_batches(2):
        assert batch["inputs"].shape == (64, 17)
        for inp, tgt, w in rows(batch):
            q, answer, _ = parity_reference(inp)
            eval_lengths.append(q)
            assert tgt[q] == answer and w.sum() == 1 and w[q] == 1
    assert min(eval_lengths) >= 9 and max(eval_lengths) <= 16
    # Both parities occur.
    batch = task.train_batch(2)
    assert set(batch["targets"][batch["weights"] > 0].tolist()) == {1, 2}


def test_parity_running_and_pad_to():
    task = Parity(min_len=1, max_len=6, batch_size=32, seed=5, running=True,
                  eval_min_len=7, eval_max_len=10, pad_to=12)
    assert task.seq_len == task.eval_seq_len == 12
    for batch in [task.train_batch(3), task.eval_batches(1)[0]]:
        assert batch["inputs"].shape == (32, 12)
        for inp, tgt, w in rows(batch):
            q, answer, running = parity_reference(inp)
            np.testing.assert_array_equal(np.flatnonzero(w), np.arange(q + 1))
            np.testing.assert_array_equal(tgt[:q], running)
            assert tgt[q] == answer == running[-1]
            assert (tgt[q + 1:] == 0).all()


def test_mqar_answers():
    P, Q, nk, nv = 6, 4, 10, 7
    task = AssociativeRecall(P, Q, nk, nv, batch_size=64, seed=0)
    assert task.vocab_size == 1 + nk + nv and task.seq_len == 2 * P + Q
    for batch in [task.train_batch(0)] + task.eval_batches(1):
        for inp, tgt, w in rows(batch):
            keys, values = inp[0:2 * P:2], inp[1:2 * P:2]
            assert len(set(keys.tolist())) == P
            assert ((1 <= keys) & (keys <= nk)).all()
            assert ((nk < values) & (values <= nk + nv)).all()
            table = dict(zip(keys.tolist(), values.tolist()))
            queries = inp[2 * P:]
            assert len(set(queries.tolist())) == Q  # Q <= P: no repeats.
            np.testing.assert_array_equal(np.flatnonzero(w),
                                          np.arange(2 * P, 2 * P + Q))
            np.testing.assert_array_equal(tgt[w > 0],
                                          [table[q] for q in queries])
            assert (tgt[w == 0] == 0).all()


def test_mqar_more_queries_than_pairs():
    task = AssociativeRecall(num_kv_pairs=2, num_queries=9, num_keys=4,
                             num_values=3, batch_size=8, seed=0)
    for inp, tgt, _ in rows(task.train_batch(0)):
        table = dict(zip(inp[0:4:2].tolist(), inp[1:4:2].tolist()))
        np.testing.assert_array_equal(tgt[4:], [table[q] for q in inp[4:]])


# ---------------------------------------------------------------- errors ---

def test_make_task_errors():
    with pytest.raises(ValueError,
                       match="'copy'.*char, mqar, parity, s5, selective_copying"):
        make_task("copy")
    with pytest.raises(TypeError, match="seq_len"):
        make_task("parity", seq_len=16)
    with pytest.raises(TypeError, match="noise, typo"):
        make_task("selective_copying", typo=1, noise=3)
    with pytest.raises(TypeError, match="text or path"):
        make_task("char", text="abc", path="x.txt", seq_len=2, batch_size=1)


def test_make_task_char(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    ds = make_task("char", path=str(path), seq_len=8, batch_size=2, seed=0)
    assert isinstance(ds, CharDataset) and ds.vocab_size == 28
    ds = make_task("char", text="ab" * 50, seq_len=8, batch_size=2)
    assert ds.vocab.chars == "ab"


@pytest.mark.parametrize("cls, kwargs, arg", [
    (SelectiveCopying, dict(num_tokens_to_memorize=0),
     "num_tokens_to_memorize"),
    (SelectiveCopying, dict(noise_length=-1), "noise_length"),
    (SelectiveCopying, dict(num_data_tokens=0), "num_data_tokens"),
    (SelectiveCopying, dict(batch_size=0), "batch_size"),
    (Parity, dict(min_len=0), "min_len"),
    (Parity, dict(min_len=5, max_len=4), "max_len"),
    (Parity, dict(eval_min_len=20, eval_max_len=10), "eval_max_len"),
    (Parity, dict(max_len=8, pad_to=9), "pad_to"),
    (AssociativeRecall, dict(num_kv_pairs=5, num_keys=4), "num_keys"),
    (AssociativeRecall, dict(num_queries=0), "num_queries"),
    (AssociativeRecall, dict(seed=-3), "seed"),
])
def test_synthetic_argument_errors(cls, kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        cls(**kwargs)


def test_non_int_arguments():
    for cls in (Parity, S5WordProblem):
        with pytest.raises(ValueError, match="running must be a bool, got 'false'"):
            cls(running="false")
    with pytest.raises(TypeError, match="batch_size"):
        Parity(batch_size=2.5)
    with pytest.raises(TypeError, match="step"):
        Parity().train_batch(1.0)
