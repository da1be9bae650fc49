"""The computational graph of one tower, as circuit discovery sees it (docs/methods.md#circuits).

Senders write into the residual stream: the input ("input", the layer-0 residual), every
attention head ("a{l}.h{h}") and every MLP ("m{l}"). Receivers read from it: each head's query,
key and value inputs separately ("a{l}.h{h}<q>", "<k>", "<v>"), each MLP's input ("m{l}") and the
final norm at the pooled position ("output"). Because every sender adds to the one residual
stream, every sender feeds every receiver downstream of it: an edge is such a (sender, receiver)
pair, and the input a receiver reads is the sum of its edges' values (plus the biases).

Index layout, used by every tensor of edge values ([sender, receiver]):
    senders:   0 = input; then per layer l the heads 1 + l(H+1) + h, and its MLP 1 + l(H+1) + H
    receivers: per layer l the queries l(3H+1) + h, keys + H, values + 2H, its MLP l(3H+1) + 3H;
               last, the output L(3H+1)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

QKV = ("q", "k", "v")
_HEAD = re.compile(r"a(\d+)\.h(\d+)")
_HEAD_INPUT = re.compile(r"a(\d+)\.h(\d+)<([qkv])>")
_MLP = re.compile(r"m(\d+)")


@dataclass(frozen=True)
class Graph:
    """The senders, receivers and edges of a tower with `n_layers` blocks of `n_heads` heads."""

    n_layers: int
    n_heads: int

    @classmethod
    def of(cls, tower) -> "Graph":
        return cls(tower.cfg.n_layers, tower.cfg.n_heads)

    # sizes and indices -----------------------------------------------------------------------
    @property
    def n_senders(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)

    @property
    def n_receivers(self) -> int:
        return self.n_layers * (3 * self.n_heads + 1) + 1

    def senders_before(self, layer: int) -> int:
        """The number of senders that write before block `layer`'s attention reads: the input and
        the heads and MLPs of blocks 0..layer-1 (indices 0..that-1)."""
        return 1 + layer * (self.n_heads + 1)

    def head_sender(self, layer: int, head: int) -> int:
        return 1 + layer * (self.n_heads + 1) + head

    def mlp_sender(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    def head_receiver(self, layer: int, head: int, qkv: str) -> int:
        return layer * (3 * self.n_heads + 1) + QKV.index(qkv) * self.n_heads + head

    def attention_receivers(self, layer: int) -> slice:
        """Block `layer`'s query, key and value receivers (3H of them, in that order)."""
        start = layer * (3 * self.n_heads + 1)
        return slice(start, start + 3 * self.n_heads)

    def mlp_receiver(self, layer: int) -> int:
        return layer * (3 * self.n_heads + 1) + 3 * self.n_heads

    @property
    def output_receiver(self) -> int:
        return self.n_layers * (3 * self.n_heads + 1)

    # names -----------------------------------------------------------------------------------
    @cached_property
    def senders(self) -> list[str]:
        names = ["input"]
        for layer in range(self.n_layers):
            names += [f"a{layer}.h{head}" for head in range(self.n_heads)] + [f"m{layer}"]
        return names

    @cached_property
    def receivers(self) -> list[str]:
        names = []
        for layer in range(self.n_layers):
            names += [f"a{layer}.h{head}<{qkv}>" for qkv in QKV for head in range(self.n_heads)] + [f"m{layer}"]
        return names + ["output"]

    @cached_property
    def _sender_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.senders)}

    @cached_property
    def _receiver_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.receivers)}

    def sender(self, name: str) -> int:
        """The index of sender `name` ("input", "a3.h5", "m3"), or a ValueError naming it."""
        if name not in self._sender_index:
            raise ValueError(f"unknown sender {name!r}: senders are 'input', heads 'a<layer>.h<head>' and MLPs "
                             f"'m<layer>' with layers 0..{self.n_layers - 1} and heads 0..{self.n_heads - 1}")
        return self._sender_index[name]

    def receiver(self, name: str) -> int:
        """The index of receiver `name` ("a3.h5<q>", "m3", "output"), or a ValueError naming it."""
        if name not in self._receiver_index:
            hint = " (a head is read through its query, key or value: 'a{l}.h{h}<q>')" if _HEAD.fullmatch(name) else ""
            raise ValueError(f"unknown receiver {name!r}{hint}: receivers are 'a<layer>.h<head><q|k|v>', MLPs "
                             f"'m<layer>' and 'output', with layers 0..{self.n_layers - 1} and heads "
                             f"0..{self.n_heads - 1}")
        return self._receiver_index[name]

    def edge(self, name: str) -> tuple[int, int]:
        """(sender, receiver) indices of edge "sender->receiver", or a ValueError naming what is wrong."""
        if not isinstance(name, str) or name.count("->") != 1:
            raise ValueError(f"edge {name!r}: write an edge as 'sender->receiver', e.g. 'a0.h1->a2.h3<q>'")
        sender_name, receiver_name = (part.strip() for part in name.split("->"))
        s, r = self.sender(sender_name), self.receiver(receiver_name)
        if not self.valid[s, r]:
            raise ValueError(f"edge {name!r}: receiver {receiver_name!r} reads the residual stream before sender "
                             f"{sender_name!r} writes to it (a receiver must be downstream of its sender)")
        return s, r

    def edge_name(self, sender: int, receiver: int) -> str:
        return f"{self.senders[sender]}->{self.receivers[receiver]}"

    def node_of_receiver(self, receiver: int) -> str:
        """The node a receiver belongs to: "a3.h5" for "a3.h5<q>", else the receiver's own name."""
        return self.receivers[receiver].split("<")[0]

    # where each node sits in the residual stream ---------------------------------------------
    @cached_property
    def write_step(self) -> Tensor:
        """[n_senders]: the half-layer step after which a sender's output is in the stream
        (input 0, heads of block l 2l + 1, its MLP 2l + 2)."""
        steps = [0]
        for layer in range(self.n_layers):
            steps += [2 * layer + 1] * self.n_heads + [2 * layer + 2]
        return torch.tensor(steps, device="cpu")  # the graph's masks live on the CPU

    @cached_property
    def read_step(self) -> Tensor:
        """[n_receivers]: the step a receiver reads (heads of block l 2l, its MLP 2l + 1, the
        output 2L); it sees every sender whose write step is at most this."""
        steps = []
        for layer in range(self.n_layers):
            steps += [2 * layer] * (3 * self.n_heads) + [2 * layer + 1]
        return torch.tensor(steps + [2 * self.n_layers], device="cpu")

    @cached_property
    def valid(self) -> Tensor:
        """[n_senders, n_receivers] bool: the edges of the graph (sender upstream of receiver)."""
        return self.write_step[:, None] <= self.read_step[None, :]

    @property
    def n_edges(self) -> int:
        return int(self.valid.sum())

    def layer_of_receiver(self, receiver: int) -> int:
        """The block a receiver belongs to (n_layers for the output)."""
        return min(int(self.read_step[receiver]) // 2, self.n_layers)

    def describe(self) -> str:
        return (f"{self.n_senders} senders, {self.n_receivers} receivers, {self.n_edges:,} edges "
                f"({self.n_layers} layers x {self.n_heads} heads)")
