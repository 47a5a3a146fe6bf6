"""One matrix product for an attention module's q, k and v projections (`lshe.compiled`'s decode step),
and, with the GEMV products (``products="gemv"``), for an MLP's gate and up projections too.

transformers' attention forwards call ``q_proj``, ``k_proj`` and ``v_proj`` on the same hidden state:
three products of unequal shapes (Llama-3.1-8B: 4096, 1024 and 1024 rows), which inductor does not
fuse. At batch 1 a product is bound by reading its weight, and one large product reads at a higher
bandwidth than three small ones: measured alone on the H200 with inductor, 14.1 us for one q+k+v
product against 12.0 + 2 x 4.0 us (docs/measurement-log.md, note 19).

`FusedProjections` stacks the three weights (and biases) of every such module in one `StackedProjection` and
points the three ``nn.Linear`` weights at slices of it: one copy in memory, and the model's eager
forward reads the same bits as before. Inside `FusedProjections.active` the three modules are replaced by
`ProjectionPart`\\ s: the first call for a hidden state computes all three projections in one product
and each part returns its slice; the family's forward itself is not touched. The hidden state is
compared by identity, so a call on another tensor computes afresh: never a stale slice. A module whose
projections have forward hooks, or were replaced since (an adapter), keeps its own projections: the
stand-ins would skip the hooks or use the old weights.

With a ``product`` (`lshe.one_row_products.linear`), the stacked products go through it, and so does
every other plain ``nn.Linear`` of the layers (`OwnProduct` stands in for it: the o and down
projections); the gate and up projections are stacked as q, k and v are, since inductor no longer sees
two products of one shape to fuse. With a ``gated`` product too (`lshe.one_row_products.silu_gate_up`),
a gated MLP whose forward is Llama's, ``down(silu(gate(x)) * up(x))``, is replaced as a whole by a
`GatedMLP` computing SiLU x up in the same kernel as the stacked product. An MLP is recognised by its
forward's bytecode (the same as `_GATED_FORWARD`'s: Llama, Mistral, Qwen2/3, OLMo2 share it) and its
activation's forward (``nn.SiLU``'s or transformers' ``SiLUActivation``'s); any other (Gemma2's GELU,
Phi3's fused ``gate_up_proj``) keeps its own forward and the stacked parts.

Each output element is the same dot product as before, but a kernel chosen for another shape may sum in
another order, so logits may differ from the eager step's in their last bits (as inductor's own
fusions already make them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")
Product = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def fusable(module: nn.Module, names: tuple[str, ...] = QKV) -> bool:
    """``module`` has plain ``nn.Linear`` projections ``names`` without hooks, of one input size, dtype
    and device, all with a bias or none (Phi3's single ``qkv_proj``, or a quantised linear, is left
    alone)."""
    linears = [getattr(module, name, None) for name in names]
    if not all(type(lin) is nn.Linear and not _hooked(lin) for lin in linears):
        return False
    weights = [lin.weight for lin in linears]
    return (
        weights[0].device.type != "meta"  # offloaded weights are swapped in by hooks at each call
        and len({w.shape[1] for w in weights}) == 1
        and len({(w.dtype, w.device) for w in weights}) == 1
        and len({lin.bias is None for lin in linears}) == 1
    )


class StackedProjection(nn.Module):
    """The stacked weight (and bias) of one module's projections (q/k/v, or gate/up), and its last
    product (``product``; None: ``F.linear``)."""

    def __init__(self, linears: list[nn.Linear], product: Product | None = None) -> None:
        super().__init__()
        self.linears = linears  # a plain list: not submodules of this one
        self.product = product
        self.sizes = [lin.out_features for lin in linears]
        self.stack()
        self.input: torch.Tensor | None = None
        self.outputs: tuple[torch.Tensor, ...] = ()
        self.served = 0

    @torch.inference_mode(False)  # normal tensors even when built inside inference mode (a later
    @torch.no_grad()  # load_state_dict writes into them)
    def stack(self) -> None:
        """Stack the linears' current weights and make theirs slices of the stack."""
        weight = torch.cat([lin.weight for lin in self.linears])
        self.weight = nn.Parameter(weight, requires_grad=False)
        for lin, w in zip(self.linears, weight.split(self.sizes), strict=True):
            lin.weight = nn.Parameter(w, requires_grad=lin.weight.requires_grad)
        self.bias = None
        if self.linears[0].bias is not None:
            bias = torch.cat([lin.bias for lin in self.linears])
            self.bias = nn.Parameter(bias, requires_grad=False)
            for lin, b in zip(self.linears, bias.split(self.sizes), strict=True):
                lin.bias = nn.Parameter(b, requires_grad=lin.bias.requires_grad)

    def stale(self) -> bool:
        """A linear's weight no longer lies in the stack (e.g. ``model.to(dtype)`` replaced it)."""
        tensors = [(lin.weight, self.weight) for lin in self.linears]
        if self.bias is not None:
            tensors += [(lin.bias, self.bias) for lin in self.linears]
        return any(
            own.untyped_storage().data_ptr() != stack.untyped_storage().data_ptr()
            or own.dtype != stack.dtype
            or own.device != stack.device
            for own, stack in tensors
        )

    def part(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        if self.input is not hidden:
            product = self.product or F.linear
            self.outputs = product(hidden, self.weight, self.bias).split(self.sizes, dim=-1)
            self.input, self.served = hidden, 0
        out = self.outputs[index]
        self.served += 1
        if self.served == len(self.sizes):  # every part taken: hold no tensor until the next call
            self.input, self.outputs = None, ()
        return out


class ProjectionPart(nn.Module):
    """Stands in for one projection: its slice of the stacked product."""

    def __init__(self, stacked: StackedProjection, index: int) -> None:
        super().__init__()
        self.stacked, self.index = stacked, index

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.stacked.part(self.index, hidden)


class OwnProduct(nn.Module):
    """Stands in for a plain ``nn.Linear``: its own weight and bias, through ``product``."""

    def __init__(self, linear: nn.Linear, product: Product) -> None:
        super().__init__()
        self.linear, self.product = linear, product

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.product(hidden, self.linear.weight, self.linear.bias)


def _gated_forward(self, x):
    down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return down_proj


_GATED_FORWARD = _gated_forward.__code__


def _silu_forwards() -> tuple:
    """The forwards of the SiLU modules: ``nn.SiLU``'s and transformers' ``SiLUActivation``'s."""
    forwards = [nn.SiLU.forward]
    try:
        from transformers.activations import SiLUActivation
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    else:
        forwards.append(SiLUActivation.forward)
    return tuple(forwards)


def gated_mlp(module: nn.Module) -> bool:
    """``module`` computes ``down_proj(silu(gate_proj(x)) * up_proj(x))``: its class's forward has the
    bytecode of `_gated_forward`, its ``act_fn``'s class runs ``nn.SiLU``'s or transformers'
    ``SiLUActivation``'s forward (a subclass of another activation named SiLU does not), all without
    hooks, and its three projections are plain fusable ``nn.Linear``\\ s."""
    forward = getattr(type(module).forward, "__code__", None)
    act = getattr(module, "act_fn", None)
    down = getattr(module, "down_proj", None)
    return (
        forward is not None
        and (forward.co_code, forward.co_names, forward.co_consts, forward.co_varnames)
        == (
            _GATED_FORWARD.co_code,
            _GATED_FORWARD.co_names,
            _GATED_FORWARD.co_consts,
            _GATED_FORWARD.co_varnames,
        )
        and isinstance(act, nn.Module)
        and type(act).forward in _silu_forwards()
        and not _hooked(act)
        and not _hooked(module)
        and fusable(module, GATE_UP)
        and type(down) is nn.Linear
        and not _hooked(down)
        and down.weight.device.type != "meta"
    )


class GatedMLP(nn.Module):
    """Stands in for a gated MLP (`gated_mlp`): ``down(gated(x, stacked gate/up))`` through the
    products, with the MLP's own linears and activation as they were when it was made."""

    def __init__(self, mlp: nn.Module, gated: Product, product: Product) -> None:
        super().__init__()
        self.mlp, self.gated, self.product = mlp, gated, product
        self.children_then = (mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn)
        self.forwards_then = (type(mlp).forward, type(mlp.act_fn).forward)
        self.stacked = StackedProjection([mlp.gate_proj, mlp.up_proj])

    def intact(self) -> bool:
        """The MLP is still the gated MLP it was recognised as (`gated_mlp`): the same children, the
        same forwards of its class and its activation's class (either may be patched since), no hooks.
        Identity checks only: `FusedProjections.active` asks before every step it runs."""
        mlp = self.mlp
        now = (mlp._modules.get("gate_proj"), mlp._modules.get("up_proj"), mlp._modules.get("down_proj"),
               mlp._modules.get("act_fn"))  # fmt: skip
        return (
            now == self.children_then
            and (type(mlp).forward, type(now[3]).forward) == self.forwards_then
            and not any(_hooked(m) for m in (mlp, *now))
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weight, bias, down = self.stacked.weight, self.stacked.bias, self.mlp.down_proj
        if hidden.numel() == hidden.shape[-1]:  # one row: the gated kernel
            activated = self.gated(hidden, weight, bias)
        else:  # several: the stacked product, and the SiLU x up where inductor can fuse it
            gate, up = self.product(hidden, weight, bias).chunk(2, dim=-1)
            activated = self.mlp.act_fn(gate) * up
        return self.product(activated, down.weight, down.bias)


class FusedProjections:
    """The fusable modules under ``layers`` (``groups`` of projection names), their parts swapped in
    inside `active`; with a ``product``, every other plain ``nn.Linear`` of the layers too
    (`OwnProduct`); with a ``gated`` product too, every gated MLP as a whole (`GatedMLP`).

    ``entries`` holds (module, names, originals, stand-ins) per swapped group, single linear or MLP."""

    def __init__(
        self,
        layers: list[nn.Module],
        groups: tuple[tuple[str, ...], ...] = (QKV,),
        product: Product | None = None,
        gated: Product | None = None,
    ) -> None:
        if gated is not None and product is None:
            raise ValueError("a gated product needs a product for the MLP's down projection")
        self.entries: list[tuple[nn.Module, tuple[str, ...], list[nn.Module], list[nn.Module]]] = []
        # Modules an entry already stands in for (an MLP with everything in it): a module met again (one
        # shared by two layers) or inside a replaced MLP gets no second entry.
        taken: set[int] = set()

        def add(module: nn.Module, names: tuple[str, ...], originals: list, stand_ins: list) -> None:
            self.entries.append((module, names, originals, stand_ins))
            taken.update(id(m) for own in originals for m in own.modules())

        for layer in layers:
            if gated is not None:
                for parent in layer.modules():
                    for name, child in parent.named_children():
                        if id(child) not in taken and gated_mlp(child):
                            add(parent, (name,), [child], [GatedMLP(child, gated, product)])
            for module in layer.modules():
                for names in groups:
                    if id(module) not in taken and fusable(module, names):
                        linears = [getattr(module, name) for name in names]
                        if any(id(lin) in taken for lin in linears):
                            continue
                        stacked = StackedProjection(linears, product)
                        add(module, names, linears, [ProjectionPart(stacked, i) for i in range(len(names))])
            if product is None:
                continue
            for module in layer.modules():
                for name, child in module.named_children():
                    if (
                        type(child) is nn.Linear
                        and id(child) not in taken
                        and not _hooked(child)
                        and child.weight.device.type != "meta"  # offloaded: swapped in by hooks per call
                    ):
                        add(module, (name,), [child], [OwnProduct(child, product)])

    @contextlib.contextmanager
    def active(self):
        """The modules call the stand-ins inside this block (stacks rebuilt first where the model's
        weights were replaced since). A module keeps its own projections where one of them was
        replaced since (e.g. by an adapter) or has hooks: the stand-ins would skip them. While
        global module hooks are registered (``register_module_forward_hook``, which every module
        call runs), nothing is swapped: the stand-ins would hide the modules they replace."""
        swapped = []
        global_hooks = _global_hooks()
        try:  # a failed restack (out of memory) restores what was swapped in before it
            for module, names, linears, parts in [] if global_hooks else self.entries:
                own = [module._modules.get(name) for name in names]
                if own != linears or any(_hooked(lin) for lin in linears):  # replaced or hooked since
                    continue
                if isinstance(parts[0], GatedMLP) and not parts[0].intact():
                    continue
                stacked = getattr(parts[0], "stacked", None)
                if stacked is not None and stacked.stale():
                    stacked.stack()
                for name, part in zip(names, parts, strict=True):
                    module._modules[name] = part
                swapped.append((module, names, linears, parts))
            yield
        finally:
            for module, names, linears, parts in swapped:
                for name, lin in zip(names, linears, strict=True):
                    module._modules[name] = lin
                stacked = getattr(parts[0], "stacked", None)
                if stacked is not None and stacked.input is not None:  # a part not taken (Module's
                    stacked.input, stacked.outputs, stacked.served = None, (), 0  # setattr is slow)


def _global_hooks() -> bool:
    """Forward hooks or pre-hooks registered for every module (``register_module_forward_hook``)."""
    from torch.nn.modules import module as torch_module

    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


def _hooked(module: nn.Module) -> bool:
    """``module`` has forward hooks or pre-hooks of its own, or a ``forward`` set on the instance
    (accelerate's ``add_hook_to_module`` wraps it so)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__)
