"""Low-communication outer steps for data-parallel training: NoLoCo (no all-reduce: each worker averages with a
random small group) and the DiLoCo baseline it is compared with (an all-reduce over all workers).

Both keep, per worker, outer weights phi and a momentum buffer beside the model's (inner) weights theta, and every
`sync_every` inner steps replace theta by an outer update of phi. The arithmetic is written once, as fused weighted
sums (pysoup.ops.weighted_sum: an fp32 fma chain in input order, one rounding into the output dtype), over flat
buffers in the distributed classes and over each tensor in the one-process simulations; the sums are elementwise, so
both give the same bits, and `NoLoCo.outer_step` on N processes equals `simulate_outer_step` bit for bit.

NoLoCo's outer step (official SparseOptimizerC; ALGORITHMS.md): perm = numpy.random.default_rng(step + 1)
.permutation(world); element i of perm joins group i mod (world / g). In its group G (in perm order) worker i
receives (theta_j - phi_j) and phi_j from each peer and computes, with alpha the outer learning rate and beta the
momentum,

    m_i   <- beta m_i + alpha mean_G(theta_j - phi_j) + alpha (mean_G phi_j - phi_i)
    phi_i <- phi_i + m_i
    theta_i <- phi_i

Rounding (the same in the distributed step and the simulation): d_j = theta_j - phi_j is rounded once into the
parameters' dtype (what is sent); the new m_i is ONE fused sum over [phi_G (in group order), phi_i, m_i, d_G] with
the fp32 weights [alpha/g]*g, -alpha, beta, [alpha/g]*g (the large, nearly cancelling phi terms first), rounded into
m's dtype (float32); phi_i + m_i is one fp32 addition rounded into phi's dtype.

DiLoCo's outer step: every worker holds the same phi and buffer b; Delta_i = theta_i - phi (rounded into the
parameters' dtype, then widened to float32) is all-reduced in float32 (torch.distributed SUM, then divided by the
world size) and the outer optimizer is torch.optim.SGD with Nesterov
momentum on the outer gradient G = -mean_i Delta_i (DiLoCo's outer lr 0.7, momentum 0.9): b <- mu b + G;
phi <- phi - lr (G + mu b); theta_i <- phi. With outer_lr=1 and momentum=0 it is plain local SGD (periodic model
averaging). The all-reduce's summation order is the library's, so the distributed DiLoCo equals its simulation to
fp32 rounding, not bit for bit; every worker gets the same bits.

Only parameters are synchronised (batch-norm statistics stay each worker's, as in DiLoCo); the inner optimizer's
state is untouched.
"""

from __future__ import annotations

import math

from pysoup.errors import PlanError

_FLOATS = ("float32", "float16", "bfloat16")


# -- the arithmetic, shared by the distributed steps and the simulations ------------------------------------------
def noloco_groups(step: int, world: int, group_size: int = 2) -> list:
    """NoLoCo's groups at inner step `step`: numpy.random.default_rng(step + 1).permutation(world), element i going
    to group i mod (world / group_size) (strided, not contiguous); each group in permutation order.

    Args:
        step: the inner-step counter at the sync (every worker passes the same one).
        world: the number of workers, a multiple of group_size.
        group_size: g, the workers per group (2 in the paper).

    Returns:
        world / g lists of g ranks; every worker computes the same lists.

    Example:
        >>> noloco_groups(100, 4)
        [[0, 3], [1, 2]]
    """
    import numpy as np

    _check_world(world, group_size)
    perm = np.random.default_rng(step + 1).permutation(world)
    n = world // group_size
    return [[int(perm[i]) for i in range(k, world, n)] for k in range(n)]


def _check_world(world, group_size):
    if not isinstance(group_size, int) or group_size < 1:
        raise PlanError(f"NoLoCo: group_size must be an integer >= 1, got {group_size!r}")
    if not isinstance(world, int) or world < 1 or world % group_size:
        raise PlanError(f"NoLoCo: world size {world} is not a multiple of group_size {group_size}")


def _sum(tensors, weights, out_dtype, ops, normalize=False):
    """pysoup.ops.weighted_sum with the caller's backend and threads (`ops`: a dict of both)."""
    from pysoup.ops import weighted_sum

    return weighted_sum(tensors, weights, out_dtype=out_dtype, normalize=normalize, **ops)


def _delta(theta, phi, ops):
    """theta - phi rounded once into phi's dtype: what a worker sends."""
    return _sum([theta, phi], [1.0, -1.0], phi.dtype, ops)


def _noloco_update(phi, m, group_phis, group_deltas, outer_lr, momentum, ops) -> None:
    """m <- beta m + alpha mean(d_G) + alpha (mean(phi_G) - phi); phi <- phi + m; in place, one fused sum each."""
    g = len(group_phis)
    w = outer_lr / g
    inputs = [*group_phis, phi, m, *group_deltas]
    m.copy_(_sum(inputs, [w] * g + [-outer_lr, momentum] + [w] * g, m.dtype, ops))
    phi.copy_(_sum([phi, m], [1.0, 1.0], phi.dtype, ops))


def _diloco_update(phi, buf, mean_delta, outer_lr, momentum, nesterov, ops) -> None:
    """torch.optim.SGD(momentum, nesterov, dampening 0) on the outer gradient G = -mean_delta, in place."""
    buf.copy_(_sum([buf, mean_delta], [momentum, -1.0], buf.dtype, ops))  # b <- mu b + G
    if nesterov:  # phi - lr (G + mu b)
        phi.copy_(_sum([phi, mean_delta, buf], [1.0, outer_lr, -outer_lr * momentum], phi.dtype, ops))
    else:  # phi - lr b
        phi.copy_(_sum([phi, buf], [1.0, -outer_lr], phi.dtype, ops))


# -- the one-process simulations ----------------------------------------------------------------------------------
def simulate_outer_step(
    thetas, phis, ms, step: int, outer_lr=0.7, momentum=0.5, group_size=2, backend="auto", threads=None
):
    """NoLoCo's outer step for `world = len(thetas)` workers in one process, with exactly the arithmetic of
    NoLoCo.outer_step (so an N-process run equals it bit for bit).

    Args:
        thetas: per worker, its inner weights: a list of tensors (float32, float16 or bfloat16), or one tensor;
            set to the new phi in place.
        phis: per worker, its outer weights, the same shapes and dtypes; updated in place.
        ms: per worker, its momentum buffers (float32), the same shapes; updated in place.
        step: the inner-step counter at the sync (it seeds the groups).
        outer_lr: alpha. momentum: beta. group_size: g.
        backend, threads: of pysoup.ops.weighted_sum (every backend and thread count gives the same bits).

    Returns:
        The groups used (noloco_groups(step, world, group_size)).

    Example:
        >>> phis, thetas = [torch.zeros(1), torch.ones(1)], [torch.full((1,), 0.2), torch.full((1,), 0.8)]
        >>> ms = [torch.zeros(1), torch.zeros(1)]
        >>> simulate_outer_step(thetas, phis, ms, step=0)
        [[0, 1]]
        >>> round(float(phis[0]), 6)
        0.35
    """
    import torch

    thetas, phis, ms = (_per_worker(x) for x in (thetas, phis, ms))
    world = len(thetas)
    if not (len(phis) == len(ms) == world):
        raise PlanError(f"simulate_outer_step: {world} thetas, {len(phis)} phis and {len(ms)} momenta")
    for i in range(world):
        _check_like(thetas[i], phis[i], f"worker {i}'s phi")
        _check_like(thetas[i], ms[i], f"worker {i}'s momentum", momentum=True)
    groups = noloco_groups(step, world, group_size)
    ops = {"backend": backend, "threads": threads}
    with torch.no_grad():
        deltas = [[_delta(t, p, ops) for t, p in zip(thetas[i], phis[i])] for i in range(world)]
        sent = [[p.clone() for p in phis[i]] for i in range(world)]  # phi_j as the peers received it
        for group in groups:
            for i in group:
                for k, (phi, m) in enumerate(zip(phis[i], ms[i])):
                    gp, gd = [sent[j][k] for j in group], [deltas[j][k] for j in group]
                    _noloco_update(phi, m, gp, gd, outer_lr, momentum, ops)
                for theta, phi in zip(thetas[i], phis[i]):
                    theta.copy_(phi)
    return groups


def simulate_diloco_step(thetas, phi, buf, outer_lr=0.7, momentum=0.9, nesterov=True, backend="auto", threads=None):
    """DiLoCo's outer step for `len(thetas)` workers in one process: the mean pseudo-gradient, then Nesterov SGD
    on the shared outer weights; every worker's theta is set to the new phi.

    Args:
        thetas: per worker, a list of tensors (or one tensor); set to phi in place.
        phi: the shared outer weights (a list of tensors or one tensor); updated in place.
        buf: the shared momentum buffers (float32); updated in place.
        outer_lr, momentum, nesterov: the outer SGD (DiLoCo: 0.7, 0.9, Nesterov; 1, 0 is local SGD).
        backend, threads: of pysoup.ops.weighted_sum.

    Returns:
        None.

    Example:
        >>> simulate_diloco_step([[w0], [w1]], [phi], [buf])   # doctest: +SKIP
    """
    import torch

    thetas = _per_worker(thetas)
    phi, buf = _tensors(phi), _tensors(buf)
    for i, theta in enumerate(thetas):
        _check_like(theta, phi, f"worker {i}'s theta")
    _check_like(phi, buf, "the momentum", momentum=True)
    ops = {"backend": backend, "threads": threads}
    with torch.no_grad():
        for k, (p, b) in enumerate(zip(phi, buf)):
            deltas = [_delta(theta[k], p, ops) for theta in thetas]
            mean = _sum(deltas, [1.0] * len(deltas), b.dtype, ops, normalize=True)
            _diloco_update(p, b, mean, outer_lr, momentum, nesterov, ops)
        for theta in thetas:
            for t, p in zip(theta, phi):
                t.copy_(p)


def _tensors(x) -> list:
    import torch

    return [x] if isinstance(x, torch.Tensor) else list(x)


def _per_worker(xs) -> list:
    return [_tensors(x) for x in xs]


def _check_like(ref, other, what, momentum=False):
    if len(ref) != len(other):
        raise PlanError(f"{what}: {len(other)} tensors for {len(ref)} parameters")
    for k, (a, b) in enumerate(zip(ref, other)):
        if a.shape != b.shape:
            raise PlanError(f"{what}: tensor {k} is {list(b.shape)}, the parameter {list(a.shape)}")
        dtype = str(b.dtype).replace("torch.", "")
        if (dtype != "float32") if momentum else (b.dtype != a.dtype or dtype not in _FLOATS):
            want = "float32" if momentum else f"{a.dtype} (float32, float16 or bfloat16)"
            raise PlanError(f"{what}: tensor {k} is {dtype}, expected {want}")


# -- the distributed outer steps -----------------------------------------------------------------------------------
class _OuterStep:
    """The parameters of one worker, their flat outer weights and momentum per dtype, and the process group."""

    def __init__(self, model_or_params, outer_lr, momentum, sync_every, process_group, backend, threads):
        import torch

        if isinstance(model_or_params, torch.nn.Module):
            params = list(model_or_params.parameters())
        elif isinstance(model_or_params, torch.Tensor):
            params = [model_or_params]
        else:
            params = list(model_or_params)
        name = type(self).__name__
        if not params:
            raise PlanError(f"{name}: no parameters")
        for k, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise PlanError(f"{name}: parameter {k} is a {type(p).__name__}, not a tensor")
            if str(p.dtype).replace("torch.", "") not in _FLOATS:
                raise PlanError(f"{name}: parameter {k} is {p.dtype}; float32, float16 or bfloat16 only")
            if p.device != params[0].device:
                raise PlanError(f"{name}: parameter {k} is on {p.device}, parameter 0 on {params[0].device}")
        for label, v in (("outer_lr", outer_lr), ("momentum", momentum)):
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise PlanError(f"{name}: {label} must be a finite number, got {v!r}")
        if not isinstance(sync_every, int) or sync_every < 1:
            raise PlanError(f"{name}: sync_every must be an integer >= 1, got {sync_every!r}")
        self.outer_lr, self.momentum, self.sync_every = float(outer_lr), float(momentum), sync_every
        self.process_group = process_group
        self.ops = {"backend": backend, "threads": threads}
        self.params = params
        self._by_dtype = {}  # dtype -> the parameters of that dtype, in model order
        for p in params:
            self._by_dtype.setdefault(p.dtype, []).append(p)
        with torch.no_grad():
            self.phi = {d: self._flat(ps).clone() for d, ps in self._by_dtype.items()}
            self.m = {d: torch.zeros(f.numel(), dtype=torch.float32, device=f.device) for d, f in self.phi.items()}

    def due(self, step: int) -> bool:
        """Whether inner step `step` (counted from 1) ends with an outer step."""
        return step > 0 and step % self.sync_every == 0

    @staticmethod
    def _flat(ps):
        import torch

        return torch.cat([p.detach().reshape(-1) for p in ps])

    def _set_params(self) -> None:
        """theta <- phi."""
        import torch

        with torch.no_grad():
            for d, ps in self._by_dtype.items():
                views = torch.split(self.phi[d], [p.numel() for p in ps])
                torch._foreach_copy_([p.detach() for p in ps], [v.view(p.shape) for v, p in zip(views, ps)])

    def state_dict(self) -> dict:
        """{"phi": [...], "momentum": [...]}: per parameter, in model order, views of the flat buffers (for a
        checkpoint; torch.save copies them)."""
        import torch

        out = {"phi": [None] * len(self.params), "momentum": [None] * len(self.params)}
        index = {id(p): k for k, p in enumerate(self.params)}
        for d, ps in self._by_dtype.items():
            sizes = [p.numel() for p in ps]
            for key, flat in (("phi", self.phi[d]), ("momentum", self.m[d])):
                for p, v in zip(ps, torch.split(flat, sizes)):
                    out[key][index[id(p)]] = v.view(p.shape)
        return out

    def load_state_dict(self, state: dict) -> None:
        """Restores phi and the momentum from state_dict()'s form (the parameters are not changed)."""
        import torch

        mine = self.state_dict()
        for key in ("phi", "momentum"):
            got = list(state[key])
            if len(got) != len(mine[key]) or any(a.shape != b.shape for a, b in zip(got, mine[key])):
                raise PlanError(f"{type(self).__name__}.load_state_dict: {key} does not match the parameters")
            with torch.no_grad():
                torch._foreach_copy_(mine[key], got)

    def _world_and_rank(self):
        import torch.distributed as dist

        return dist.get_world_size(self.process_group), dist.get_rank(self.process_group)

    def _numel_bytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.phi.values())


class NoLoCo(_OuterStep):
    """NoLoCo's outer optimizer on one worker of a torch.distributed group: every `sync_every` inner steps, an
    exchange with g - 1 random peers (point to point: isend/irecv of one flat buffer per dtype per peer; gloo on the
    CPU, NCCL on GPUs) and the momentum update of the module docstring. No collective call: a worker waits only for
    its group.

    Args:
        model_or_params: an nn.Module (its parameters) or a list of parameters; their values now are phi's start.
        outer_lr: alpha (0.7). momentum: beta (0.5, the paper's configs). sync_every: H (50).
        group_size: g (2); the world size must be a multiple of it.
        process_group: the torch.distributed group (default: the whole world); ranks in it are the workers.
        backend, threads: of pysoup.ops.weighted_sum (every backend and thread count gives the same bits).

    Attributes:
        phi, m: per parameter dtype, the flat outer weights (that dtype) and momentum (float32).

    Example:
        >>> noloco = NoLoCo(model, sync_every=50)                     # doctest: +SKIP
        >>> for step, batch in enumerate(loader, start=1):            # doctest: +SKIP
        ...     loss_fn(model, batch).backward(); opt.step(); opt.zero_grad()
        ...     if noloco.due(step):
        ...         noloco.outer_step(step)
    """

    def __init__(
        self,
        model_or_params,
        outer_lr=0.7,
        momentum=0.5,
        sync_every=50,
        group_size=2,
        process_group=None,
        backend="auto",
        threads=None,
    ):
        if not isinstance(group_size, int) or group_size < 1:
            raise PlanError(f"NoLoCo: group_size must be an integer >= 1, got {group_size!r}")
        super().__init__(model_or_params, outer_lr, momentum, sync_every, process_group, backend, threads)
        self.group_size = group_size

    def groups(self, step: int, world: int) -> list:
        """noloco_groups(step, world, self.group_size): the same on every worker."""
        return noloco_groups(step, world, self.group_size)

    def bytes_per_outer_step(self) -> int:
        """Bytes one worker sends per outer step (and receives): theta - phi and phi, to each of g - 1 peers."""
        return 2 * (self.group_size - 1) * self._numel_bytes()

    def outer_step(self, step: int) -> list:
        """Exchanges with this worker's group at inner step `step`, updates m and phi, sets the parameters to phi.

        Returns:
            The group this worker averaged with (ranks in the process group, in permutation order).
        """
        import torch
        import torch.distributed as dist

        world, rank = self._world_and_rank()
        group = next(g for g in self.groups(step, world) if rank in g)
        peers = [j for j in group if j != rank]
        with torch.no_grad():
            sends, recvs, ops = {}, {}, []
            for tag, (d, ps) in enumerate(self._by_dtype.items()):
                phi = self.phi[d]
                n = phi.numel()
                sends[d] = torch.cat([_delta(self._flat(ps), phi, self.ops), phi])
                recvs[d] = {j: torch.empty(2 * n, dtype=d, device=phi.device) for j in peers}
                for j in peers:
                    peer = j if self.process_group is None else dist.get_global_rank(self.process_group, j)
                    ops.append(dist.P2POp(dist.isend, sends[d], peer, self.process_group, tag))
                    ops.append(dist.P2POp(dist.irecv, recvs[d][j], peer, self.process_group, tag))
            if ops:
                for request in dist.batch_isend_irecv(ops):
                    request.wait()
            for d in self._by_dtype:
                phi, n = self.phi[d], self.phi[d].numel()
                got = {rank: sends[d], **recvs[d]}
                group_phis = [phi if j == rank else got[j][n:] for j in group]
                deltas = [got[j][:n] for j in group]
                _noloco_update(phi, self.m[d], group_phis, deltas, self.outer_lr, self.momentum, self.ops)
        self._set_params()
        return group


class DiLoCo(_OuterStep):
    """DiLoCo's outer optimizer on one worker: every `sync_every` inner steps, an all-reduce of theta - phi over
    all workers and Nesterov SGD on phi (the module docstring). The baseline NoLoCo is compared with; outer_lr=1,
    momentum=0 gives plain local SGD (model averaging every H steps).

    Args:
        model_or_params: an nn.Module or a list of parameters; their values now are phi's start (the same on every
            worker: start from one initialisation).
        outer_lr: 0.7. momentum: 0.9. sync_every: H (50). nesterov: True (torch.optim.SGD's Nesterov form).
        process_group: the torch.distributed group (default: the whole world).
        backend, threads: of pysoup.ops.weighted_sum.

    Example:
        >>> diloco = DiLoCo(model)              # doctest: +SKIP
        >>> if diloco.due(step):                # doctest: +SKIP
        ...     diloco.outer_step()
    """

    def __init__(
        self,
        model_or_params,
        outer_lr=0.7,
        momentum=0.9,
        sync_every=50,
        nesterov=True,
        process_group=None,
        backend="auto",
        threads=None,
    ):
        super().__init__(model_or_params, outer_lr, momentum, sync_every, process_group, backend, threads)
        self.nesterov = bool(nesterov)

    def bytes_per_outer_step(self, world: int | None = None) -> int:
        """Bytes one worker sends per outer step in a ring all-reduce of theta - phi in float32: 2 (world - 1) / world
        of its size (default world: the process group's)."""
        world = self._world_and_rank()[0] if world is None else world
        return 2 * (world - 1) * 4 * sum(f.numel() for f in self.phi.values()) // world

    def outer_step(self, step: int | None = None) -> None:
        """All-reduces theta - phi, steps phi, sets the parameters to phi. (`step` is accepted for symmetry with
        NoLoCo and unused.)"""
        import torch
        import torch.distributed as dist

        world, _ = self._world_and_rank()
        with torch.no_grad():
            for d, ps in self._by_dtype.items():
                phi = self.phi[d]
                delta = _delta(self._flat(ps), phi, self.ops).float()  # a sum of world values: not in bf16
                dist.all_reduce(delta, op=dist.ReduceOp.SUM, group=self.process_group)
                mean = delta.float() / world
                _diloco_update(phi, self.m[d], mean, self.outer_lr, self.momentum, self.nesterov, self.ops)
        self._set_params()
