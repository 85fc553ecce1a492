"""DiffRate: Chen et al., "DiffRate: Differentiable Compression Rate for Efficient Vision Transformers",
ICCV 2023 (Sec. 3.2 token sorting, pruning and merging; Sec. 3.3 differentiable discrete proxy; Sec. 3.4
the FLOPs-constrained search), as OpenGVLab/DiffRate's code does it (``DiffRate/patch/deit.py``,
``DiffRate/ddp.py``, ``DiffRate/merge.py``, ``engine.py``).

In every block, between the attention residual and the MLP, the tokens are sorted by their head-mean
[CLS] attention ([CLS] stays first); the first ``prune[i]`` tokens are kept (the rest dropped) and of
those the first ``merge[i]`` stay while the others are merged into their most similar kept token.
Counts include [CLS], as the authors' ``compression_rate.json`` writes them.

**Eval (and training with a fixed schedule)**: the per-block kept numbers ``prune``/``merge``, or
``schedule``, one of the authors' searched DeiT schedules by GFLOPs (the default config: DeiT-S 2.9).
Tokens are really removed: a block runs on ``min(n, prune[i], merge[i])`` tokens after its compression.

**Search** (``search=True``; Sec. 3.3): per block 1.. and per kind, learnable logits θ over the
candidate kept numbers ``c = P, P-g, …`` (g = ``granularity``), π = softmax(θ); the kept number is
``ceil(c·π) + 1`` (ceil forward, identity backward), and position t keeps with probability
``Σ_{c_i+1 > t} π_i``. A training forward keeps every token and multiplies a keep-mask (0/1 forward,
the probability's gradient backward) into the attention of the next blocks through the masked
softmax (``accel.reducers.masked_softmax``); the FLOPs of the kept numbers are differentiable and
``training_losses`` returns ``loss_weight·(GFLOPs − target)²``. Eval forwards and ``export()`` use
the kept numbers of the current θ, a fixed schedule the config takes back
(``reducer.prune=… reducer.merge=…``; ``scripts/diffrate_schedule.py`` reads them from a checkpoint).

**keep_rate**: with ``search=True`` the target of the search as a fraction of the uncompressed
network's FLOPs (their formula), unless ``target_flops`` (GFLOPs, the paper's knob) is given; with a
fixed schedule the schedule says everything and a keep rate other than 1 is refused.

Where the code differs from the paper (the code is followed):
  - the merge similarity is the cosine of the tokens ``x`` after the attention residual (detached),
    not of the keys;
  - merged features are the *unweighted* mean of the destination and its sources
    (``scatter_reduce(mean)``), ignoring sizes; the size of a source is scaled by its similarity to
    its destination before being added (so sizes are not token counts); training clamps those
    scaled sizes at 1, eval does not;
  - block 0 never compresses; kept numbers are cast with ``int``; the masked softmax has the eps
    terms of ``softmax_with_policy`` (so a training forward is not a plain softmax even at θ giving
    no compression); the current count in training is ``int(mask[0].sum())``;
  - the gradient of the FLOPs through ``min(n, prune, merge)`` goes to both kept numbers and not to n.
Not copied: the kept numbers are computed in float32 under autocast (theirs run in fp16 under AMP); an
eval forward uses the current θ (theirs, the θ of the last training forward); blocks that compress
nothing at eval skip the sort (it changes only the order of the tokens, never the logits).
Proportional attention (``+ log size``) is always on, as in their code. One prefix token ([CLS]) only.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from accel.errors import UserInputError
from accel.reducers.attention import AttnOut, attention, attn_residual, check_plain_block, mlp_residual
from accel.reducers.base import State, TokenReducer, TracesSources, check_keep_rate
from accel.reducers.diffrate_schedules import authors_schedule
from accel.reducers.masked_softmax import masked_softmax
from accel.reducers.selection import PrunedMergedTokens

Schedule = Tuple[List[int], List[int]]


def ceil_ste(x: torch.Tensor) -> torch.Tensor:
    """``ceil(x)`` forward, identity backward (exactly an integer forward: no ``x + (ceil - x)`` rounding)."""
    return x.ceil().detach() + (x - x.detach())


def kept_number(logits: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """DiffRate's kept number (with [CLS]) of one block from its logits over ``candidates``:
    ``ceil(c·softmax(θ)) + 1``, differentiable by the straight-through ceil; float32."""
    # torch.dot, not matmul: autocast promotes dot (float32 in, float32 out) where it would run matmul in
    # bf16/fp16, and it needs no autocast context (which the meta device has not).
    return ceil_ste(torch.dot(candidates, logits.float().softmax(dim=-1))) + 1


def schedule_from_logits(prune_logits: Sequence[torch.Tensor], merge_logits: Sequence[torch.Tensor],
                         candidates: torch.Tensor) -> Schedule:
    """The fixed schedule (prune, merge kept numbers per block, [CLS] included) that searched logits
    (one vector over the candidates per block 1..depth-1) give; block 0 keeps everything."""
    with torch.no_grad():
        kept = torch.stack([candidates[0] + 1] + [kept_number(row, candidates) for row in (*prune_logits, *merge_logits)])
    full, *numbers = (int(k) for k in kept.tolist())   # one read-back for the whole schedule
    return [full] + numbers[:len(prune_logits)], [full] + numbers[len(prune_logits):]


def gflops(embed_dim: int, patch_size: Sequence[int], num_classes: int, num_patches: int, kept) -> torch.Tensor:
    """DiffRate's FLOPs count in GFLOPs (``make_diffrate_class.calculate_flop_*``): per block
    ``4NC² + 2N²C`` before and ``8NC²`` after its compression to ``min(N, prune, merge)``; plus the
    patch embedding (counted over N with [CLS]) and the classifier. ``kept``: (prune, merge) per block,
    numbers or float32 tensors; with tensors the result is differentiable (straight-through min: the
    gradient goes to both kept numbers, none to N)."""
    C = float(embed_dim)
    n0 = float(num_patches + 1)
    kept = list(kept)
    tensors = [k for pair in kept for k in pair if isinstance(k, torch.Tensor)]
    device = tensors[0].device if tensors else torch.device("cpu")   # plain numbers: counted on the CPU
    kept = [(torch.as_tensor(p, dtype=torch.float32, device=device),
             torch.as_tensor(m, dtype=torch.float32, device=device)) for p, m in kept]
    # A fill on the kept numbers' device, not a copy from the host (which synchronises on a GPU).
    n = torch.full((), n0, device=device)
    flops = torch.zeros((), device=device)
    for p, m in kept:
        flops = flops + 4 * n * C * C + 2 * n * n * C
        n = torch.minimum(torch.minimum(n, p), m).detach() + (p - p.detach()) + (m - m.detach())
        flops = flops + 8 * n * C * C
    flops = flops + n0 * C * (patch_size[0] * patch_size[1] * 3) + C * num_classes
    return flops / 1e9


def schedule_from_state_dict(state_dict: Dict[str, torch.Tensor]) -> Tuple[List[int], List[int], float]:
    """(prune, merge, GFLOPs): the schedule a searched network's state dict holds (timm keys plus
    ``reducer.candidates`` and ``reducer.{prune,merge}_logits.<i>``; ``accel.checkpoint.read_state_dict``
    of a run's checkpoint)."""
    if "reducer.candidates" not in state_dict:
        raise UserInputError("This checkpoint holds no DiffRate search (no reducer.candidates); expected one "
                             "written by a run with reducer=diffrate reducer.search=true.")
    blocks = sum(1 for k in state_dict if k.startswith("reducer.prune_logits."))
    candidates = state_dict["reducer.candidates"].float()
    prune, merge = schedule_from_logits([state_dict[f"reducer.prune_logits.{i}"] for i in range(blocks)],
                                        [state_dict[f"reducer.merge_logits.{i}"] for i in range(blocks)], candidates)
    embed_dim = state_dict["pos_embed"].shape[-1]
    patch = tuple(state_dict["patch_embed.proj.weight"].shape[-2:])
    num_classes = state_dict["head.weight"].shape[0] if "head.weight" in state_dict else 0
    cost = gflops(embed_dim, patch, num_classes, int(candidates[0]), zip(prune, merge))
    return prune, merge, float(cost)


def _check_schedule(name: str, values, depth: int, least: int) -> List[int]:
    values = [int(v) for v in values]
    if len(values) != depth or min(values) < least:
        raise UserInputError(f"DiffRate {name}={values}: expected {depth} kept numbers (one per block, [CLS] "
                             f"included, each ≥ {least}), e.g. the authors' compression_rate.json lists.")
    return values


class DiffRate(TracesSources, TokenReducer):
    """Token pruning and merging with per-block kept numbers, fixed or searched (DiffRate, ICCV 2023).

    Args:
        prune: kept numbers after pruning, one per block, [CLS] included (``compression_rate.json``'s
            ``prune_kept_num``); with ``merge``, required unless ``schedule`` or ``search``.
        merge: kept numbers after merging, likewise (``merge_kept_num``).
        schedule: one of the authors' searched DeiT schedules by its GFLOPs (DeiT-S: 2.3, 2.5, 2.7, 2.9,
            3.1; ``accel.reducers.diffrate_schedules``), chosen for the DeiT width at binding.
        search: learn the kept numbers (θ under ``reducer.prune_logits.<i>`` / ``reducer.merge_logits.<i>``,
            i = 0 for block 1):
            training forwards are the differentiable search, eval forwards use the current θ.
        granularity: gap between candidate kept numbers (their ``--granularity``, 4).
        target_flops: the search target in GFLOPs (their ``--target_flops``); None: ``keep_rate`` of the
            uncompressed network's FLOPs.
        loss_weight: λ of ``λ·(GFLOPs − target)²`` (their ``lamb``, 5).
        keep_rate: the search target as a fraction of the full FLOPs; must be 1 without ``search`` or
            with ``target_flops``.
        trace_source: record which input tokens each token holds (``MergedTokens.source``; pictures).
        explicit_attention: eval attention as the full N×N matrix, as the reference code does.
    """

    knob = "schedule"

    def __init__(self, prune: Optional[Sequence[int]] = None, merge: Optional[Sequence[int]] = None,
                 search: bool = False, granularity: int = 4, target_flops: Optional[float] = None,
                 loss_weight: float = 5.0, keep_rate: float = 1.0, trace_source: bool = False,
                 explicit_attention: bool = False, schedule: Optional[float] = None) -> None:
        super().__init__(keep_rate, explicit_attention)
        self.search = bool(search)
        given = {k: v for k, v in (("schedule", schedule), ("prune", prune), ("merge", merge)) if v is not None}
        if self.search and given:
            raise UserInputError(f"DiffRate search=true learns the kept numbers, but {given} was given; expected "
                                 "reducer.schedule=null reducer.prune=null reducer.merge=null for a search.")
        if schedule is not None and (prune is not None or merge is not None):
            raise UserInputError(f"DiffRate got schedule={schedule} and prune/merge lists {given}; expected one of "
                                 "them: reducer.schedule=null to use the lists.")
        if not self.search and schedule is None and (prune is None or merge is None):
            raise UserInputError("DiffRate without search needs reducer.schedule (one of the authors' searched "
                                 "GFLOPs) or both reducer.prune and reducer.merge (kept numbers per block); "
                                 "expected lists such as compression_rate.json's, or reducer.search=true.")
        if int(granularity) < 1:
            raise UserInputError(f"DiffRate granularity={granularity}: expected a positive number of tokens.")
        self.schedule = None if schedule is None else float(schedule)
        self._prune = None if prune is None else list(prune)
        self._merge = None if merge is None else list(merge)
        self.granularity = int(granularity)
        self.target_flops = None if target_flops is None else float(target_flops)
        self.loss_weight = float(loss_weight)
        self.trace_source = bool(trace_source)
        self._check_keep_rate(self.keep_rate)
        self._cached: Optional[Tuple[Tuple[int, int], Schedule]] = None

    def _check_keep_rate(self, keep_rate: float) -> None:
        if keep_rate == 1.0:
            return
        if not self.search:
            raise UserInputError(f"DiffRate keep_rate={keep_rate}: a fixed schedule (reducer.prune/merge) sets the "
                                 "kept numbers itself; expected keep_rate=1.0, or reducer.search=true to search "
                                 "for that fraction of the FLOPs.")
        if self.target_flops is not None:
            raise UserInputError(f"DiffRate got both target_flops={self.target_flops} and keep_rate={keep_rate}; "
                                 "expected one search target: keep_rate=1.0 or reducer.target_flops=null.")

    def set_keep_rate(self, keep_rate: float) -> None:
        """With ``search``: the target fraction of the full FLOPs. Otherwise only 1.0 is accepted."""
        value = check_keep_rate(keep_rate)
        self._check_keep_rate(value)
        super().set_keep_rate(value)

    # --- binding: the schedule's length, and the search parameters -----------------------------------------------
    def bind(self, vit: nn.Module) -> None:
        super().bind(vit)
        if vit.num_prefix_tokens != 1 or getattr(vit, "cls_token", None) is None:
            raise UserInputError(f"DiffRate needs a ViT with exactly one prefix token ([CLS]), but this one has "
                                 f"{vit.num_prefix_tokens}; expected a plain (not distilled, no register) DeiT/ViT.")
        for blk in vit.blocks:
            check_plain_block(blk, "DiffRate")
        self.depth = len(vit.blocks)
        self.num_patches = self.grid[0] * self.grid[1]
        self.embed_dim = vit.embed_dim
        self.patch_size = tuple(vit.patch_embed.patch_size)
        self.num_classes = vit.num_classes
        full = [self.num_patches + 1] * self.depth
        # Once here rather than per step: the float is a read-back the training step should not make.
        self._full_gflops = self.gflops((full, full))
        if not self.search:
            if self.schedule is not None:
                self._prune, self._merge = authors_schedule(self.schedule, self.embed_dim, self.depth)
            self._prune = _check_schedule("prune", self._prune, self.depth, 1)
            self._merge = _check_schedule("merge", self._merge, self.depth, 2)
            return
        candidates = torch.arange(self.num_patches, 0, -self.granularity, dtype=torch.float32)
        # Kept numbers (patches) to choose from; persistent, so a checkpoint alone gives its schedule.
        self.register_buffer("candidates", candidates)
        # Position t (with [CLS] at 0) keeps with the probability of the candidates with c + 1 > t: a prefix of
        # the candidates (they descend), so the cumulative sum at its last index, added in their order.
        t = torch.arange(self.num_patches + 1, dtype=torch.float32)
        self.register_buffer("cover_last", ((candidates[None] + 1 > t[:, None]).sum(1) - 1), persistent=False)
        # One vector per block 1.. (block 0 never compresses), 1-D as theirs: timm's optimizer factory then
        # leaves them out of weight decay, as their AdamW(weight_decay=0).
        self.prune_logits = nn.ParameterList([torch.zeros(len(candidates)) for _ in range(self.depth - 1)])
        self.merge_logits = nn.ParameterList([torch.zeros(len(candidates)) for _ in range(self.depth - 1)])

    # --- the schedule ------------------------------------------------------------------------------------------
    def export(self) -> Schedule:
        """(prune, merge): the kept numbers per block ([CLS] included) used at eval — the fixed schedule,
        or the one the current θ gives (the config takes it back as ``reducer.prune=… reducer.merge=…``)."""
        if not self.search:
            return list(self._prune), list(self._merge)
        prune, merge = self._searched_schedule()
        return list(prune), list(merge)

    # Token counts that are values of θ must be read back to the host before the eval forward can take its
    # shapes: that read-back is cached per θ version (one per update, not per forward), and torch.compile
    # runs it outside the graph (one graph break per forward, no recompilation while θ is unchanged), as
    # dynamo can neither read a tensor's version counter nor guard on a tensor's values.
    @torch.compiler.disable
    def _searched_schedule(self) -> Schedule:
        key = tuple(p._version for p in (*self.prune_logits, *self.merge_logits))
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, schedule_from_logits(self.prune_logits, self.merge_logits, self.candidates))
        return self._cached[1]

    def gflops(self, schedule: Optional[Schedule] = None) -> float:
        """GFLOPs of ``schedule`` (default: ``export()``) by the authors' formula."""
        prune, merge = schedule or self.export()
        return float(gflops(self.embed_dim, self.patch_size, self.num_classes, self.num_patches, zip(prune, merge)))

    @property
    def target_gflops(self) -> float:
        """The search target: ``target_flops``, or ``keep_rate`` of the uncompressed network's GFLOPs."""
        if self.target_flops is not None:
            return self.target_flops
        return self.keep_rate * self._full_gflops

    # --- forward -------------------------------------------------------------------------------------------------
    def reset(self, x: torch.Tensor, num_prefix: int) -> State:
        state = super().reset(x, num_prefix)
        state["size"] = None
        if self.trace_source:
            b, n = x.shape[:2]
            state["source"] = torch.eye(n, device=x.device, dtype=x.dtype).expand(b, n, n)
        if self.search and self.training:
            state["mask"] = x.new_ones(x.shape[0], x.shape[1], dtype=torch.float32)
            state["size"] = x.new_ones(x.shape[0], x.shape[1], 1, dtype=torch.float32)
            state["kept"] = ()
        else:
            state["schedule"] = self.export()
        return state

    def block(self, i: int, blk: nn.Module, x: torch.Tensor, state: State) -> Tuple[torch.Tensor, State]:
        if self.search and self.training:
            return self._search_block(i, blk, x, state)
        return self._fixed_block(i, blk, x, state)

    def _fixed_block(self, i: int, blk: nn.Module, x: torch.Tensor, state: State) -> Tuple[torch.Tensor, State]:
        prune, merge = state["schedule"][0][i], state["schedule"][1][i]
        n, size = x.shape[1], state["size"]
        keep = min(n, prune)
        merges = merge < keep
        bias = size.log().transpose(1, 2).unsqueeze(1) if size is not None else None
        if keep == n and not merges and bias is None:
            return self.full_block(blk, x), state
        a = attention(blk.attn, blk.norm1(x), bias=bias, cls_row=keep < n or merges, explicit=self.explicit_attention)
        x = attn_residual(blk, x, a)
        if keep == n and not merges:
            return mlp_residual(blk, x), state
        # Sorted by head-mean [CLS] attention, [CLS] first; the first `keep` survive the pruning.
        order = a.cls_attn[:, :, 1:].mean(dim=1).topk(keep - 1, dim=1).indices + 1
        order = torch.cat([order.new_zeros(order.shape[0], 1), order], dim=1)
        x = x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))
        if size is None:   # float32 whatever the activations' dtype (as ToMe: sizes grow past bf16's integers)
            size = x.new_ones(x.shape[0], keep, 1, dtype=torch.float32)
        else:
            size = size.gather(1, order[..., None])
        source = state.get("source")
        if source is not None:
            source = source.gather(1, order[..., None].expand(-1, -1, source.shape[-1]))
        if merges:
            dst_of, similarity = _match(x, merge)
            x = _merge_into(x, dst_of, merge, "mean")
            size = _merge_into(size[:, :merge], dst_of, merge, "sum", size[:, merge:] * similarity[..., None])
            if source is not None:
                source = _merge_into(source, dst_of, merge, "amax")
        state["size"] = size
        if source is not None:
            state["source"] = source
        self.record(state, PrunedMergedTokens(i, self.grid, size=size.detach(), source=source, num_prefix=1))
        return mlp_residual(blk, x), state

    def _search_block(self, i: int, blk: nn.Module, x: torch.Tensor, state: State) -> Tuple[torch.Tensor, State]:
        mask, size = state["mask"], state["size"]
        out, cls_row = _masked_attention(blk.attn, blk.norm1(x), mask, size.log().transpose(1, 2).unsqueeze(1))
        x = attn_residual(blk, x, out)
        order = cls_row[:, :, 1:].mean(dim=1).sort(dim=1, descending=True).indices + 1
        order = torch.cat([order.new_zeros(order.shape[0], 1), order], dim=1)
        x = x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))
        size = size.gather(1, order[..., None])
        mask = mask.gather(1, order)
        if i == 0:   # never compresses (their block 0 has the single candidate "all")
            full = x.new_full((), float(self.num_patches + 1), dtype=torch.float32)   # a fill, not a host copy
            state["kept"] = state["kept"] + ((full, full),)
            state["mask"], state["size"] = mask, size
            return mlp_residual(blk, x), state
        prune = kept_number(self.prune_logits[i - 1], self.candidates)
        merge = kept_number(self.merge_logits[i - 1], self.candidates)
        state["kept"] = state["kept"] + ((prune, merge),)
        n = mask[0].sum().int()   # int truncation of the float count, as theirs
        mask = torch.where(prune < n, mask * self._token_mask(self.prune_logits[i - 1], prune, n), mask)
        mid = torch.minimum(n, prune.detach().int())
        merges = merge < mid
        m = merge.detach().int()
        t = torch.arange(x.shape[1], device=x.device)
        dst_of, similarity = _match_masked(x, t < m, (t >= m) & (t < mid))
        scaled = torch.where(((t >= m) & (t < mid))[None, :, None], size * similarity[..., None], size)
        clamped = torch.where((t < mid)[None, :, None], scaled.clamp(min=1), size)
        x = torch.where(merges, _merge_in_place(x, dst_of, mean=True), x)
        size = torch.where(merges, _merge_in_place(clamped, dst_of, mean=False), size)
        mask = torch.where(merges, mask * self._token_mask(self.merge_logits[i - 1], merge, mid), mask)
        state["mask"], state["size"] = mask, size
        return mlp_residual(blk, x), state

    def _token_mask(self, logits: torch.Tensor, kept: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """Their ``get_token_mask(n)``: 0 on positions [kept, n), 1 elsewhere, forward; the keep
        probability of each position backward."""
        prob = logits.float().softmax(dim=-1).cumsum(dim=0)[self.cover_last]
        t = torch.arange(prob.shape[0], device=prob.device)
        hard = 1.0 - ((t >= kept.detach().int()) & (t < n)).float()
        return hard - prob.detach() + prob

    def training_losses(self, state: State) -> Dict[str, torch.Tensor]:
        """The FLOPs constraint of the search, ``loss_weight·(GFLOPs − target)²`` (Sec. 3.4)."""
        if "kept" not in state:
            return {}
        return {"flops": self.loss_weight * (self.search_gflops(state) - self.target_gflops) ** 2}

    def search_gflops(self, state: State) -> torch.Tensor:
        """The differentiable GFLOPs of a search forward's kept numbers."""
        return gflops(self.embed_dim, self.patch_size, self.num_classes, self.num_patches, state["kept"])

    def extra_repr(self) -> str:
        what = f"granularity={self.granularity}, target_flops={self.target_flops}" if self.search else \
            f"prune={self._prune}, merge={self._merge}"
        return f"search={self.search}, {what}, keep_rate={self.keep_rate}, trace_source={self.trace_source}"


# --- merging (DiffRate/merge.py get_merge_func) --------------------------------------------------------------------
def _match(x: torch.Tensor, kept: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each token after the first ``kept``: the index of its most similar token among the first ``kept``
    ([CLS] excluded) by cosine of ``x``, and that similarity ([B, n - kept] each)."""
    with torch.no_grad():
        metric = x / x.norm(dim=-1, keepdim=True)
        similarity = metric[:, kept:] @ metric[:, :kept].transpose(1, 2)
        similarity[..., 0] = -math.inf
        best, dst_of = similarity.max(dim=-1)
    return dst_of, best


def _merge_into(x: torch.Tensor, dst_of: torch.Tensor, kept: int, mode: str,
                src: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The first ``kept`` tokens of ``x`` with the sources (``x[:, kept:]``, or ``src``) reduced into their
    destinations (``mean`` and ``amax`` include the destination itself)."""
    dst, src = (x[:, :kept], x[:, kept:]) if src is None else (x, src)
    index = dst_of[..., None].expand(-1, -1, dst.shape[-1])
    return dst.scatter_reduce(1, index, src.to(dst.dtype), reduce=mode)


def _match_masked(x: torch.Tensor, dst: torch.Tensor, src: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``_match`` on a full-length sequence: for the tokens where ``src`` [N] holds, the most similar
    token where ``dst`` holds ([CLS] excluded) as a one-hot assignment [B, N, N] (zero rows elsewhere),
    and the similarity [B, N]."""
    with torch.no_grad():
        metric = x / x.norm(dim=-1, keepdim=True)
        similarity = metric @ metric.transpose(1, 2)
        allowed = dst.clone()
        allowed[0] = False
        similarity = similarity.masked_fill(~allowed, -math.inf)
        best, idx = similarity.max(dim=-1)
        # A comparison, not F.one_hot: one_hot reads the indices' range back to the host.
        positions = torch.arange(x.shape[1], device=x.device)
        assign = (idx[..., None] == positions).to(x.dtype) * src[None, :, None].to(x.dtype)
    return assign, best


def _merge_in_place(x: torch.Tensor, assign: torch.Tensor, mean: bool) -> torch.Tensor:
    """Training-mode merging that keeps the length: each destination becomes the sum (or the mean,
    counting itself) of itself and its assigned sources; every other token is unchanged."""
    gathered = x + assign.transpose(1, 2).to(x.dtype) @ x
    if not mean:
        return gathered
    return gathered / (1 + assign.sum(dim=1)).to(x.dtype)[..., None]


def _masked_attention(attn: nn.Module, x: torch.Tensor, keep: torch.Tensor, bias: torch.Tensor):
    """timm ``Attention`` with the masked softmax over ``keep`` [B, N] and the size bias [B, 1, 1, N];
    returns the output (as ``attention``'s AttnOut) and the [CLS] row of the (dropped-out) weights."""
    B, N, C = x.shape
    H, D = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = attn.attn_drop(masked_softmax((q @ k.transpose(-2, -1)) * attn.scale + bias, keep))
    out = attn.proj_drop(attn.proj(attn.norm((probs.to(v.dtype) @ v).transpose(1, 2).reshape(B, N, H * D))))
    return AttnOut(out, None, None), probs[:, :, 0]
