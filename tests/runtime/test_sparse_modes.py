"""The sparse modes behind the one AttentionMode interface, on the CPU in fp64.

- mage / quest with a 100% budget give exactly dense's tokens; herald with a 100% budget gives
  mage's, from every selection source.
- herald with the `cpu` source ranks pages by the same exact scores as mage's step-0 pass, so at
  a real budget (a strict subset of pages) both pick the same pages and give the same tokens.
- below the full budget, the pages each mode reads keep most of the exact attention mass that the
  heaviest pages of the same count would (a measure a random selection fails).
- every run has the residency assertion on: attention never reads a page that is not resident.
"""
import pytest
import torch

from runtime import Engine, EngineConfig
from runtime.attention import Phase
from runtime.config import ModelConfig, RopeConfig, SparseConfig
from runtime.decoding import GenerationRequest
from runtime.model import Transformer
from runtime.reference import reference_decode
from runtime.selection import forced_pages

VOCAB, MASK, EOS = 48, 47, 46


def tiny_model(layers=3, seed=0) -> Transformer:
    config = ModelConfig(architecture="qwen3", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024,
                         rope=RopeConfig(theta=10000.0), qk_norm=True, mask_token_id=MASK, block_size=4,
                         eos_token_ids=(EOS,))
    torch.manual_seed(seed)
    model = Transformer(config).to(torch.float64).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB - 2, (n,), generator=g).tolist() for n in lengths]


PROMPTS = prompts([70, 45, 93])


def generate(model, mode, max_batch=2, max_new=12, **sparse):
    sparse.setdefault("check_residency", True)
    sparse.setdefault("page_size", 4)
    sparse.setdefault("sink_tokens", 4)
    sparse.setdefault("local_window", 8)
    sparse.setdefault("compact_group", 16)
    config = EngineConfig(model_path="unused", mode=mode, device="cpu", dtype="float64", progress=False,
                          unmasking="fixed", max_batch_size=max_batch, prefill_chunk_size=16,
                          sparse=SparseConfig(**sparse))
    engine = Engine(config, model=model)
    results = engine.generate(PROMPTS, max_new_tokens=max_new, stop_at_eos=False)
    return [r.tokens for r in results], engine


def test_full_budget_equals_dense(model):
    dense, _ = generate(model, "dense")
    for mode, extra in [("mage", {}), ("mage", {"granularity": "token"}), ("mage", {"query": "center"}),
                        ("quest", {})]:
        got, _ = generate(model, mode, budget_fraction=1.0, dense_layers=0, **extra)
        assert got == dense, (mode, extra)


def test_sparse_loop_gives_the_reference_decoders_tokens(model):
    """Greedy decoding through herald (full budget; the lookahead's drafts are built on the device
    from step 0's proposals) gives the tokens of the recompute-everything reference decoder."""
    got, engine = generate(model, "herald", budget_fraction=1.0, source="gpu-compact", lookahead=True)
    for prompt, tokens in zip(PROMPTS, got):
        seq = engine.make_sequence(GenerationRequest(prompt=prompt, max_new_tokens=12, stop_at_eos=False))
        assert tokens == reference_decode(model, seq, engine.settings).generated


@pytest.mark.parametrize("source", ["cpu", "gpu-compact", "split"])
def test_herald_full_budget_equals_mage(model, source):
    mage, _ = generate(model, "mage", budget_fraction=1.0, dense_layers=0)
    herald, engine = generate(model, "herald", budget_fraction=1.0, source=source)
    assert herald == mage
    assert engine.last_timeline and all(b["pages_selected"] > 0 for b in engine.last_timeline)


@pytest.mark.parametrize("query", ["mean", "positions"])
def test_herald_cpu_source_selects_what_mage_selects(model, monkeypatch, query):
    """Budget 20% with 4-token pages (a strict subset). Layer 0 is dense in both modes, so layer 1's
    step-0 queries agree and the CPU scan of host keys must pick the pages mage's exact pass picks,
    with either selection query."""
    import runtime.herald.mode
    import runtime.resident_sparse

    def recording(module, log):
        original = module.select_pages

        def select(scores, lens, config, plan=None):
            selection = original(scores, lens, config, plan)
            log.append(selection.entries.cpu())
            return selection
        monkeypatch.setattr(module, "select_pages", select)

    mage_log, herald_log = [], []
    recording(runtime.resident_sparse, mage_log)
    recording(runtime.herald.mode, herald_log)
    generate(model, "mage", budget_fraction=0.2, dense_layers=1, max_new=4, query=query)
    _, engine = generate(model, "herald", budget_fraction=0.2, dense_layers=1, source="cpu", max_new=4, query=query)
    # the first block: layers 1 and 2 select once each; layer 1 sees the same inputs in both modes
    # (later blocks follow tokens that step 0 - exact in mage, sparse in herald - may have changed)
    first_mage, first_herald = mage_log[0], herald_log[0]
    assert torch.equal(first_mage, first_herald)
    counts = (first_mage >= 0).sum(-1)
    assert 0 < counts.max() < 68 // 4  # a strict subset of the first rows' 68 (and 44) context pages
    timeline = engine.last_timeline
    assert all(b["pages_fetched"] <= b["pages_selected"] for b in timeline)


# ------------------------------------------------------------------------------------------------
# below the full budget: the attention mass each selection keeps


def peaked_model() -> Transformer:
    """tiny_model with its q/k norm weights 5x larger, so each query's attention falls on a few pages,
    as a trained model's does. With tiny_model's own weights attention is almost uniform: at a 10%
    budget the best pages beyond the forced ones keep barely more than random ones (0.290 of the
    mass against 0.286), so no check of the selection could tell them apart."""
    model = tiny_model()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                param.mul_(5.0)
    return model


class SelectionMass:
    """Spies on every sparse attention a mode runs (on the CPU: `table_attention_torch`) and adds up,
    per (row, KV head) of each call, the exact attention mass over the committed context that falls on
    what the call reads (`kept`), on the forced pages alone (`forced`: sinks, local window, last page),
    on the forced pages plus the heaviest others of the same page count (`best`), and what a uniformly
    random choice of those other pages would keep on average (`random`).

    A query's mass on a set of context keys is exp(lse over the set - lse over the whole context);
    `kept` is computed from the keys the attention is given, so it is the mass of what the mode really
    reads, whatever its page table or cache slots say. Masses are averaged over the block's positions
    and the KV head's query heads (the mean softmax a selection serves)."""

    def __init__(self, monkeypatch):
        import runtime.herald.mode
        import runtime.resident_sparse
        self.totals = dict(kept=0.0, forced=0.0, best=0.0, random=0.0)
        self.calls = 0
        self._current = None  # (mode, layer) of the layer running now
        for cls in (runtime.resident_sparse.MageAttention, runtime.resident_sparse.QuestAttention,
                    runtime.herald.mode.HeraldAttention):
            monkeypatch.setattr(cls, "run", self._spy_run(cls.run))
        for module in (runtime.resident_sparse, runtime.herald.mode):
            monkeypatch.setattr(module, "table_attention_torch", self._spy_attention(module.table_attention_torch))

    def _spy_run(self, run):
        def spied(mode, layer, q, k, v):
            self._current = (mode, layer)
            return run(mode, layer, q, k, v)
        return spied

    def _spy_attention(self, attend):
        def spied(q, k_block, v_block, k_pages, v_pages, table, kv_len, scale, **scales):
            # scales: fp8 pages' (k_scale, v_scale), None here: these runs keep K/V in the model's dtype
            self._measure(q, k_pages, table, kv_len, scale)
            return attend(q, k_block, v_block, k_pages, v_pages, table, kv_len, scale, **scales)
        return spied

    @staticmethod
    def _context_keys(mode, layer: int) -> torch.Tensor:
        """[N, Hkv, M * P, D] every committed key of the planned rows, in context order."""
        if mode.name == "herald":  # the host store holds the whole context
            store, table = mode.store.k(layer), mode._buf.store_table
        else:  # mage and quest keep it resident
            store, table = mode.k_cache[layer], mode.store_table(mode.pages_per_seq)
        keys = store[table.long()]  # [N, M, Hkv, P, D]
        return keys.permute(0, 2, 1, 3, 4).flatten(2, 3)

    def _measure(self, q, k_pages, table, kv_len, scale) -> None:
        mode, layer = self._current
        n, hq, t, d = q.shape
        hkv, p = table.shape[1], mode.page_size
        queries = q.reshape(n, hkv, hq // hkv * t, d)
        entries = table.clamp(min=0).long()
        if k_pages.dim() == 4:  # a store [pages, Hkv, P, D]: each head reads its own page
            read = k_pages[entries, torch.arange(hkv)[None, :, None]]
        else:  # a cache pool [slots, P, D]
            read = k_pages[entries]
        read = read.flatten(2, 3)  # [N, Hkv, K * P, D]
        read_scores = torch.einsum("nhqd,nhld->nhql", queries, read) * scale
        read_valid = torch.arange(read.shape[2])[None, None] < kv_len.long()[..., None]
        read_scores = read_scores.masked_fill(~read_valid[:, :, None], float("-inf"))
        lens = mode.batch.context_lens
        keys = self._context_keys(mode, layer)
        scores = torch.einsum("nhqd,nhld->nhql", queries, keys) * scale
        scores = scores.masked_fill(~(torch.arange(keys.shape[2])[None] < lens[:, None])[:, None, None], float("-inf"))
        kept = torch.exp(torch.logsumexp(read_scores, -1) - torch.logsumexp(scores, -1)).mean(-1)  # [N, Hkv]
        num_pages = keys.shape[2] // p
        page_mass = torch.softmax(scores, -1).mean(2).view(n, hkv, num_pages, p).sum(-1)  # [N, Hkv, M]
        forced = forced_pages(lens, num_pages, mode.sparse, "cpu")[:, None].expand(n, hkv, num_pages)
        others = (torch.arange(num_pages)[None] * p < lens[:, None])[:, None] & ~forced
        forced_mass = (page_mass * forced).sum(-1)
        extra = (table >= 0).sum(-1) - forced.sum(-1)  # pages chosen beyond the forced ones
        heaviest = page_mass.masked_fill(~others, 0.0).sort(-1, descending=True).values.cumsum(-1)
        chosen_mass = heaviest.gather(-1, (extra - 1).clamp(min=0)[..., None])[..., 0]  # the `extra` heaviest
        best = forced_mass + torch.where(extra > 0, chosen_mass, 0.0)
        random = forced_mass + extra / others.sum(-1) * (page_mass * others).sum(-1)
        # exact for every call: the forced pages are read, and no choice of as many pages keeps more than the best
        assert bool((kept >= forced_mass - 1e-9).all() and (kept <= best + 1e-9).all()), (mode.name, layer)
        for name, value in (("kept", kept), ("forced", forced_mass), ("best", best), ("random", random)):
            self.totals[name] += float(value.sum())
        self.calls += 1

    def share_of_best(self, name: str) -> float:
        """What `name` keeps beyond the forced pages, as a share of what the best pages keep beyond them."""
        forced = self.totals["forced"]
        return (self.totals[name] - forced) / (self.totals["best"] - forced)


@pytest.mark.parametrize("mode, extra", [("mage", {}), ("quest", {}), ("herald", {"source": "cpu"}),
                                         ("herald", {"source": "gpu-compact"}), ("herald", {"source": "split"})])
def test_below_full_budget_each_mode_reads_the_heavy_pages(monkeypatch, mode, extra):
    """At a 10% budget (1-3 pages chosen beyond the 5-7 forced ones, of 8-14 candidates), the pages each
    mode reads keep, beyond the forced ones, at least 60% of what the heaviest pages of the same count
    keep, summed over every sparse attention call of the run (every step and commit pass of every
    block, layers 1-2); measured: 0.72 (mage, which keeps step 0's choice for the whole block) to 0.82
    (quest). A random choice keeps 0.41-0.43 here on average, which the test checks: with each mode's
    `select_pages` fed random scores instead, every case fails (0.41-0.45)."""
    mass = SelectionMass(monkeypatch)
    got, _ = generate(peaked_model(), mode, budget_fraction=0.1, dense_layers=1, **extra)
    assert [len(t) for t in got] == [12] * len(PROMPTS)
    assert mass.calls >= 2 * len(PROMPTS)  # both sparse layers of at least each prompt's first block
    assert mass.share_of_best("random") < 0.45, "the bound below would not tell a random selection apart"
    assert mass.share_of_best("kept") >= 0.6, mass.totals


def test_token_budget_must_be_smaller_than_the_context(model):
    """Only the request whose context the budget would cover whole is refused; the others run."""
    tokens, engine = generate(model, "mage", budget_tokens=64)
    assert [len(t) for t in tokens] == [12, 0, 12]
    refused = engine.last_stats
    assert refused.errors == 1
    config = EngineConfig(model_path="unused", mode="mage", device="cpu", dtype="float64", progress=False,
                          sparse=SparseConfig(budget_tokens=64, page_size=4, sink_tokens=4, local_window=8))
    result = Engine(config, model=model).generate([PROMPTS[1]], max_new_tokens=4)[0]
    assert result.finish_reason == "error"
    assert "budget_tokens=64 is not smaller than the 44-token context of request 0" in result.error


def test_mode_specific_refusals(model):
    with pytest.raises(ValueError, match="granularity='page'"):
        generate(model, "herald", granularity="token")
    with pytest.raises(ValueError, match="source='gpu-exact' selects from step 0's exact attention"):
        generate(model, "herald", source="gpu-exact", lookahead=True)
    with pytest.raises(ValueError, match="granularity='page'"):
        generate(model, "quest", granularity="token")


# ------------------------------------------------------------------------------------------------
# on a GPU: the Triton kernels, CUDA-graph replay and the real side-stream fetches


def generate_cuda(model, mode, graphs=True, max_batch=2, prompts=None, stream_priority=True, **sparse):
    sparse.setdefault("page_size", 16)
    sparse.setdefault("sink_tokens", 16)
    sparse.setdefault("local_window", 16)
    sparse.setdefault("compact_group", 16)
    sparse.setdefault("lookahead", False)  # the synchronous path unless a test asks for the lookahead
    config = EngineConfig(model_path="unused", mode=mode, device="cuda", dtype="float32", progress=False,
                          unmasking="fixed", max_batch_size=max_batch, prefill_chunk_size=64, cuda_graphs=graphs,
                          stream_priority=stream_priority, sparse=SparseConfig(**sparse))
    engine = Engine(config, model=model)
    results = engine.generate(LONG_PROMPTS if prompts is None else prompts, max_new_tokens=24, stop_at_eos=False)
    return [r.tokens for r in results], engine


LONG_PROMPTS = prompts([300, 190, 411], seed=3)


@pytest.fixture(scope="module")
def cuda_model():
    return tiny_model().to(device="cuda", dtype=torch.float32)


@pytest.mark.gpu
def test_cuda_graph_replay_gives_the_eager_tokens(cuda_model):
    for mode, extra in [("dense", {}), ("mage", {"budget_fraction": 0.3, "dense_layers": 1}),
                        ("herald", {"budget_fraction": 0.3, "source": "gpu-compact"}),
                        ("herald", {"budget_fraction": 0.3, "source": "gpu-compact", "lookahead": True}),
                        ("herald", {"budget_fraction": 0.3, "source": "gpu-compact", "lookahead": True,
                                    "measure_draft_recall": True})]:
        eager, _ = generate_cuda(cuda_model, mode, graphs=False, **extra)
        graphed, engine = generate_cuda(cuda_model, mode, graphs=True, **extra)
        assert graphed == eager, (mode, extra)


@pytest.mark.gpu
def test_cuda_passes_on_a_high_priority_stream_give_the_same_tokens(cuda_model):
    """The passes run on the engine's high-priority stream (stream_priority, the default): every
    ordering with the side stream and with the caller's stream still holds, so the tokens are
    those of the default stream, and the caller's stream sees the finished work."""
    extra = {"budget_fraction": 0.3, "source": "gpu-compact", "lookahead": True}
    for mode, sparse in [("dense", {}), ("herald", extra)]:
        flat, _ = generate_cuda(cuda_model, mode, stream_priority=False, **sparse)
        high, engine = generate_cuda(cuda_model, mode, **sparse)
        assert high == flat, mode
        assert engine.streams.compute is not None and engine.streams.compute.priority < 0
        assert engine.streams.lookahead.priority > engine.streams.compute.priority


@pytest.mark.gpu
def test_cuda_lookahead_gathers_land_before_the_next_block_reads_them(cuda_model, monkeypatch):
    """The lookahead's gathers run on a stream of their own (lookahead_gather_stream) and the pass
    joins it before it ends. Every LOOKAHEAD pass's gather stream first sleeps ~25 ms, so a missing
    join would let the next block's step 0 read slots not yet written (the directory already names
    their pages, so nothing refetches them). Tokens must be those of gathers on the side stream."""
    from runtime.herald import HeraldAttention

    plan, delayed = HeraldAttention.plan, []

    def late_gathers(self, batch):
        plan(self, batch)
        if batch.phase is Phase.LOOKAHEAD and self.fetcher.gather_stream is not None:
            with torch.cuda.stream(self.fetcher.gather_stream):
                torch.cuda._sleep(50_000_000)
            delayed.append(batch.seq_ids)

    monkeypatch.setattr(HeraldAttention, "plan", late_gathers)
    same_length = prompts([300, 300], seed=5)  # every block after the first takes the lookahead's pages
    for graphs in (False, True):
        extra = dict(graphs=graphs, budget_fraction=0.3, source="gpu-compact", lookahead=True, prompts=same_length)
        serial, _ = generate_cuda(cuda_model, "herald", lookahead_gather_stream=False, **extra)
        count = len(delayed)
        overlapped, engine = generate_cuda(cuda_model, "herald", **extra)
        assert len(delayed) > count, "no lookahead ran on the gather stream: nothing was tested"
        assert overlapped == serial, graphs
        assert engine.streams.gather.priority < engine.streams.lookahead.priority


@pytest.mark.gpu
def test_cuda_forecast_gathers_land_before_the_next_layer_reads_them(cuda_model, monkeypatch):
    """The forecast's gathers run on the gather stream beside the layer's attention, and the next
    layer's step 0 joins them before its fetch: with that stream made to sleep ~25 ms before every
    step 0, a missing join would let attention read slots the directory names but nothing has
    written yet. Tokens, eager and replayed from graphs, are those without the forecast, and its
    recall is reported."""
    from runtime.herald import HeraldAttention

    plan, delayed = HeraldAttention.plan, []

    def late_gathers(self, batch):
        plan(self, batch)
        if batch.phase is Phase.DENOISE and batch.step == 0 and self.fetcher.gather_stream is not None:
            with torch.cuda.stream(self.fetcher.gather_stream):
                torch.cuda._sleep(50_000_000)
            delayed.append(batch.seq_ids)

    monkeypatch.setattr(HeraldAttention, "plan", late_gathers)
    for graphs in (False, True):
        extra = dict(graphs=graphs, budget_fraction=0.3, source="gpu-compact", dense_layers=1)
        without, _ = generate_cuda(cuda_model, "herald", **extra)
        count = len(delayed)
        with_forecast, engine = generate_cuda(cuda_model, "herald", forecast="next-layer", **extra)
        assert len(delayed) > count, "no step 0 ran with a gather stream: nothing was tested"
        assert with_forecast == without, graphs
        recalls = [b["forecast_recall"] for b in engine.last_timeline]
        assert recalls and all(r is not None and 0.0 <= r <= 1.0 for r in recalls), (graphs, recalls)


@pytest.mark.gpu
def test_cuda_herald_compiles_no_kernel_per_prompt_length(cuda_model):
    """Prompts whose last prefill chunks (64 tokens here) differ in length, and whose contexts and
    selections differ in size, reuse the compiled attention kernels: a long-running server must not
    compile (and keep) a variant per request. The GPU soak found herald adding ~4 per request batch."""
    from gpu_kernels.attention_kernels import merge_splits_kernel, paged_attention_kernel

    def compiled():
        return sum(len(cache[0]) for kernel in (paged_attention_kernel, merge_splits_kernel)
                   for cache in kernel.device_caches.values())

    # the same batches, chunk counts and longest prompt (so the same split counts), other lengths:
    # last chunks of 44, 37, 47, 51 tokens, then of 50, 51, 53, 59 (all padded to 64 rows)
    generate_cuda(cuda_model, "herald", budget_fraction=0.3, prompts=prompts([300, 229, 175, 115], seed=7))
    before = compiled()
    generate_cuda(cuda_model, "herald", budget_fraction=0.3, prompts=prompts([306, 243, 181, 123], seed=8))
    assert compiled() == before


@pytest.mark.gpu
def test_cuda_lookahead_runs_beside_the_block_and_is_timed(cuda_model):
    """The LOOKAHEAD pass runs on the fetch stream (eagerly, or replayed from its graph): blocks
    after the first find their pages prefetched, and the timeline has the side pass's GPU time and
    the main stream's stall."""
    same_length = prompts([300, 300], seed=5)  # the two rows run the same blocks: every block after the first is prepared
    for graphs in (False, True):
        _, engine = generate_cuda(cuda_model, "herald", graphs=graphs, budget_fraction=0.3, source="gpu-compact",
                                  lookahead=True, measure_draft_recall=True, prompts=same_length)
        timeline = engine.last_timeline
        seen = [(b["rows"], b["pages_selected"], b["pages_fetched"], b["pages_prefetched"], b["lookahead_ms"] is not None)
                for b in timeline]
        with_side = [b for b in timeline if b["lookahead_ms"] is not None]
        assert with_side and all(b["lookahead_ms"] > 0 and 0 <= b["lookahead_stall_ms"] <= b["lookahead_ms"]
                                 for b in with_side), (graphs, seen)
        assert sum(b["pages_prefetched"] for b in timeline) > 0, (graphs, seen)
        # a block whose rows were all prepared by the last block's lookahead fetches at step 0 only the
        # pages the last commit rewrote: at most 2 per (row, sparse layer, KV head) with blocks of 4
        sparse_layers, heads = cuda_model.config.num_layers - 2, cuda_model.config.num_kv_heads
        prepared = timeline[1:]
        assert len(prepared) == 5 and all(b["rows"] == 2 for b in timeline) and all(b["pages_fetched"] <= 2 * b["rows"] * sparse_layers * heads for b in prepared), \
            (graphs, seen)


@pytest.mark.gpu
def test_cuda_full_budget_modes_equal_dense(cuda_model):
    dense, _ = generate_cuda(cuda_model, "dense")
    for mode, extra in [("mage", {}), ("quest", {}), ("herald", {"source": "gpu-compact"}),
                        ("herald", {"source": "cpu"}), ("herald", {"source": "split"}),
                        ("herald", {"source": "gpu-exact"}),
                        ("herald", {"source": "gpu-compact", "lookahead": True})]:
        got, _ = generate_cuda(cuda_model, mode, budget_fraction=1.0, dense_layers=0, **extra)
        assert got == dense, (mode, extra)


@pytest.mark.gpu
def test_cuda_herald_residency_and_memory_return_to_baseline(cuda_model):
    # cuBLAS keeps a workspace per stream it ran on for the life of the process (the lookahead's side
    # stream adds one): not the mode's memory, so both measurements are taken without them
    torch.cuda.synchronize()
    torch._C._cuda_clearCublasWorkspaces()
    before = torch.cuda.memory_allocated()
    for source, lookahead in (("gpu-compact", False), ("cpu", False), ("split", False), ("gpu-compact", True)):
        _, engine = generate_cuda(cuda_model, "herald", graphs=False, budget_fraction=0.1, source=source,
                                  check_residency=True, lookahead=lookahead)
        timeline = engine.last_timeline
        assert timeline and all(b["fetch_ms"] >= 0 and b["pages_fetched"] <= b["pages_selected"] for b in timeline)
    torch.cuda.synchronize()
    torch._C._cuda_clearCublasWorkspaces()
    assert torch.cuda.memory_allocated() == before


def test_residency_assertion_catches_a_wrong_slot(model, monkeypatch):
    """Corrupt the cache's answer (two selected pages swap slots): the assertion mode must stop the
    attention from reading them."""
    from offload.page_directory import PageDirectory

    original = PageDirectory.assign

    def swapped(self, layer, rows, entries, protect=None):
        result = original(self, layer, rows, entries, protect)
        table = result.slot_table
        table[..., [0, 1]] = table[..., [1, 0]]
        return result
    monkeypatch.setattr(PageDirectory, "assign", swapped)
    with pytest.raises(AssertionError, match="would read slot"):
        generate(model, "herald", budget_fraction=0.3, source="gpu-compact")


@pytest.mark.parametrize("mode", ["dense", "mage", "quest", "herald"])
def test_same_tokens_across_runs_and_batch_compositions(model, mode):
    """Determinism: a request's tokens depend on its prompt only, not on what it shares a batch with
    (its own selection, its own cache partition) or on the run."""
    sparse = {} if mode == "dense" else {"budget_fraction": 0.3, "dense_layers": 1}
    alone, _ = generate(model, mode, max_batch=1, **sparse)
    together, _ = generate(model, mode, max_batch=3, **sparse)
    again, _ = generate(model, mode, max_batch=3, **sparse)
    assert alone == together == again


def test_herald_lookahead_prefetches_the_next_blocks_pages(model):
    """The lookahead picks the next block's pages from this block's draft and fetches them early:
    with a 100% budget that is every page, so tokens equal mage's; at 30% the run passes the
    residency assertion and most of each block's pages arrive before its step 0."""
    mage, _ = generate(model, "mage", budget_fraction=1.0, dense_layers=0)
    herald, _ = generate(model, "herald", budget_fraction=1.0, lookahead=True)
    assert herald == mage
    _, engine = generate(model, "herald", budget_fraction=0.3, lookahead=True, dense_layers=1, max_new=16,
                         measure_draft_recall=True)
    timeline = engine.last_timeline
    prefetched = sum(b["pages_prefetched"] for b in timeline)
    at_step0 = sum(b["pages_fetched"] for b in timeline[1:])
    assert prefetched > 0 and at_step0 < prefetched
    recalls = [b["draft_recall"] for b in timeline if b["draft_recall"] is not None]
    assert recalls and all(0.0 <= r <= 1.0 for r in recalls)


def test_herald_gpu_exact_step0_is_mages_exact_step0(model):
    """source='gpu-exact' (the design's literal step 0): exact attention over the host store and the
    block, whose block-mean page scores select the later steps' pages. That is mage's step 0 with
    its block-mean query and page granularity, so the tokens are mage's, at a real budget too."""
    for budget in (1.0, 0.3):
        mage, _ = generate(model, "mage", budget_fraction=budget, dense_layers=1, query="mean")
        exact, engine = generate(model, "herald", budget_fraction=budget, dense_layers=1, source="gpu-exact")
        assert exact == mage, budget
        assert all(b["pages_fetched"] <= b["pages_selected"] for b in engine.last_timeline)


@pytest.mark.parametrize("source,lookahead", [("gpu-compact", False), ("cpu", False), ("gpu-compact", True)])
def test_herald_forecast_changes_no_token_and_reports_its_recall(model, source, lookahead):
    """SparDA's training-free forecast (SparseConfig.forecast): layer l's step-0 queries select layer
    l+1's pages early, but l+1 still attends to its own exact selection, so the tokens are those
    without it (residency asserted on every pass). Its recall of each layer's selection is counted
    for the layers after the first sparse one; with the lookahead it runs only for the blocks the
    lookahead did not prepare (here: the first)."""
    extra = dict(budget_fraction=0.3, dense_layers=1, max_new=16, source=source, lookahead=lookahead)
    without, _ = generate(model, "herald", **extra)
    with_forecast, engine = generate(model, "herald", forecast="next-layer", **extra)
    assert with_forecast == without
    timeline = engine.last_timeline
    forecast = [b for b in timeline if b["forecast_recall"] is not None]
    assert forecast and all(0.0 <= b["forecast_recall"] <= 1.0 for b in forecast)
    assert all(b["forecast_recall_by_layer"][:2] == [None, None] for b in forecast)  # dense layer 0, and layer 1 has no layer before it
    assert all(r is not None for b in forecast for r in b["forecast_recall_by_layer"][2:])
    if lookahead:
        assert len(forecast) < len(timeline)
    else:
        assert len(forecast) == len(timeline)


def test_forecast_setting_is_checked():
    with pytest.raises(ValueError, match="forecast='sparda'"):
        SparseConfig(forecast="sparda")


@pytest.mark.gpu
@pytest.mark.parametrize("mode,extra", [("dense", {}),
                                        ("herald", {"budget_fraction": 0.3, "source": "gpu-compact", "lookahead": False}),
                                        ("herald", {"budget_fraction": 0.3, "source": "gpu-compact", "lookahead": True})])
def test_cuda_denoising_never_waits_for_the_device(cuda_model, monkeypatch, mode, extra):
    """Greedy rows, the fixed schedule, CUDA graphs: from the plan of a block's step 0 until its
    commit is planned, nothing synchronises with the device (the proposals, the unmasking, which
    rows run, positions, plan uploads and the last block's statistics all stay on the device, are
    staged in pinned memory or are known in advance), the lookahead's pass included. The first
    blocks are left out: they capture the graphs (with the lookahead, block 2 captures the step 0
    that takes its pages). Tokens are those of a run without the check."""
    from runtime.attention import DenseAttention
    from runtime.herald import HeraldAttention

    cls = DenseAttention if mode == "dense" else HeraldAttention
    first = 3 if extra.get("lookahead") else 2
    plan, blocks, checked = cls.plan, [], []

    def plan_watched(self, batch):
        if batch.phase is Phase.DENOISE and batch.step == 0:
            blocks.append(batch.seq_ids)
        watched = len(blocks) >= first and batch.phase in (Phase.DENOISE, Phase.LOOKAHEAD)
        # stays on through the pass, its proposals and unmasking, up to the next plan
        torch.cuda.set_sync_debug_mode("error" if watched else "default")
        if watched:
            checked.append((batch.phase, batch.step))
        plan(self, batch)

    same_length = prompts([300, 300], seed=5)  # both rows run every step of every block together
    expected, _ = generate_cuda(cuda_model, mode, prompts=same_length, **extra)
    monkeypatch.setattr(cls, "plan", plan_watched)
    try:
        config = EngineConfig(model_path="unused", mode=mode, device="cuda", dtype="float32", progress=False,
                              unmasking="fixed", max_batch_size=2, prefill_chunk_size=64, cuda_graphs=True,
                              sparse=SparseConfig(page_size=16, sink_tokens=16, local_window=16, compact_group=16,
                                                  **extra))
        results = Engine(config, model=cuda_model).generate(same_length, max_new_tokens=24, stop_at_eos=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(r.finish_reason == "length" for r in results), [r.error for r in results]
    steps = [step for phase, step in checked if phase is Phase.DENOISE]
    assert len(blocks) == 6 and steps == [0, 1, 2, 3] * (7 - first), (blocks, checked)
    assert (Phase.LOOKAHEAD, 0) in checked if extra.get("lookahead") else len(checked) == len(steps)
    assert [r.tokens for r in results] == expected

