"""The makemore backprop exercise as a library: the atomic forward chains, their manual backward, and
the one-shot closed forms. Every fused mmops kernel is checked against these.

Names follow the notebook (Karpathy, makemore part 4) so that a reader can put the two side by side.
Forward functions return a dict of every intermediate; backward functions take that dict and return a dict
of gradients named 'd' + intermediate.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


# ---------------------------------------------------------------------------------------------------------
# cross-entropy: logits -> loss
# ---------------------------------------------------------------------------------------------------------
def cross_entropy_chain(logits: Tensor, Y: Tensor) -> dict[str, Tensor]:
    """The notebook's atomic forward (mean reduction). Intermediates retain their grads when they require grad."""
    n = logits.shape[0]
    logit_maxes = logits.max(1, keepdim=True).values
    norm_logits = logits - logit_maxes  # subtract max for numerical stability
    counts = norm_logits.exp()
    counts_sum = counts.sum(1, keepdim=True)
    counts_sum_inv = counts_sum**-1
    probs = counts * counts_sum_inv
    logprobs = probs.log()
    loss = -logprobs[range(n), Y].mean()
    chain = dict(
        logits=logits, logit_maxes=logit_maxes, norm_logits=norm_logits, counts=counts, counts_sum=counts_sum,
        counts_sum_inv=counts_sum_inv, probs=probs, logprobs=logprobs, loss=loss,
    )
    _retain(chain)
    return chain


def cross_entropy_chain_backward(chain: dict[str, Tensor], Y: Tensor) -> dict[str, Tensor]:
    """Manual backward through every step of cross_entropy_chain, dloss = 1."""
    c = {k: v.detach() for k, v in chain.items()}
    logits, probs, counts = c["logits"], c["probs"], c["counts"]
    n = logits.shape[0]
    dlogprobs = torch.zeros_like(c["logprobs"])
    dlogprobs[range(n), Y] = -1.0 / n
    dprobs = (1.0 / probs) * dlogprobs
    dcounts_sum_inv = (counts * dprobs).sum(1, keepdim=True)
    dcounts = c["counts_sum_inv"] * dprobs
    dcounts_sum = (-c["counts_sum"] ** -2) * dcounts_sum_inv
    dcounts = dcounts + torch.ones_like(counts) * dcounts_sum
    dnorm_logits = counts * dcounts
    dlogits = dnorm_logits.clone()
    dlogit_maxes = (-dnorm_logits).sum(1, keepdim=True)
    # the max is a selection: its gradient goes to the argmax, written as a one-hot row
    dlogits += F.one_hot(logits.max(1).indices, num_classes=logits.shape[1]).to(logits.dtype) * dlogit_maxes
    return dict(
        dlogprobs=dlogprobs, dprobs=dprobs, dcounts_sum_inv=dcounts_sum_inv, dcounts_sum=dcounts_sum,
        dcounts=dcounts, dnorm_logits=dnorm_logits, dlogit_maxes=dlogit_maxes, dlogits=dlogits,
    )


def cross_entropy_closed_form_grad(logits: Tensor, Y: Tensor) -> Tensor:
    """dlogits in one shot: softmax; [range(n), Y] -= 1; /= n."""
    n = logits.shape[0]
    dlogits = F.softmax(logits.detach(), 1)
    dlogits[range(n), Y] -= 1
    dlogits /= n
    return dlogits


# ---------------------------------------------------------------------------------------------------------
# BatchNorm (training): hprebn -> hpreact, the notebook's Bessel-corrected variance
# ---------------------------------------------------------------------------------------------------------
def batch_norm_chain(hprebn: Tensor, bngain: Tensor, bnbias: Tensor, eps: float = 1e-5, bessel: bool = True) -> dict:
    n = hprebn.shape[0]
    bnmeani = 1 / n * hprebn.sum(0, keepdim=True)
    bndiff = hprebn - bnmeani
    bndiff2 = bndiff**2
    bnvar = 1 / (n - 1 if bessel else n) * bndiff2.sum(0, keepdim=True)  # Bessel's correction (n-1)
    bnvar_inv = (bnvar + eps) ** -0.5
    bnraw = bndiff * bnvar_inv
    hpreact = bngain * bnraw + bnbias
    chain = dict(
        hprebn=hprebn, bngain=bngain, bnbias=bnbias, bnmeani=bnmeani, bndiff=bndiff, bndiff2=bndiff2, bnvar=bnvar,
        bnvar_inv=bnvar_inv, bnraw=bnraw, hpreact=hpreact,
    )
    _retain(chain)
    return chain


def batch_norm_chain_backward(chain: dict, dhpreact: Tensor, eps: float = 1e-5, bessel: bool = True) -> dict:
    c = {k: v.detach() for k, v in chain.items()}
    n = c["hprebn"].shape[0]
    nb = n - 1 if bessel else n
    dbngain = (c["bnraw"] * dhpreact).sum(0, keepdim=True)
    dbnraw = c["bngain"] * dhpreact
    dbnbias = dhpreact.sum(0, keepdim=True)
    dbndiff = c["bnvar_inv"] * dbnraw
    dbnvar_inv = (c["bndiff"] * dbnraw).sum(0, keepdim=True)
    dbnvar = (-0.5 * (c["bnvar"] + eps) ** -1.5) * dbnvar_inv
    dbndiff2 = (1.0 / nb) * torch.ones_like(c["bndiff2"]) * dbnvar
    dbndiff = dbndiff + (2 * c["bndiff"]) * dbndiff2
    dhprebn = dbndiff.clone()
    dbnmeani = (-dbndiff).sum(0, keepdim=True)
    dhprebn += 1.0 / n * (torch.ones_like(c["hprebn"]) * dbnmeani)
    return dict(
        dbngain=dbngain, dbnbias=dbnbias, dbnraw=dbnraw, dbndiff=dbndiff, dbnvar_inv=dbnvar_inv, dbnvar=dbnvar,
        dbndiff2=dbndiff2, dbnmeani=dbnmeani, dhprebn=dhprebn,
    )


def batch_norm_closed_form_grad(hprebn, bngain, dhpreact, eps: float = 1e-5, bessel: bool = True) -> Tensor:
    """dhprebn = bngain*bnvar_inv/n * (n*dhpreact - dhpreact.sum(0) - n/(n-1)*bnraw*(dhpreact*bnraw).sum(0));
    bessel=False is the biased-variance twin (n/n = 1 in the last term)."""
    h = hprebn.detach()
    n = h.shape[0]
    var = h.var(0, keepdim=True, unbiased=bessel)
    bnvar_inv = (var + eps) ** -0.5
    bnraw = (h - h.mean(0, keepdim=True)) * bnvar_inv
    k = n / (n - 1) if bessel else 1.0
    return bngain * bnvar_inv / n * (n * dhpreact - dhpreact.sum(0) - k * bnraw * (dhpreact * bnraw).sum(0))


# ---------------------------------------------------------------------------------------------------------
# the whole MLP: emb, embcat, hprebn, BN, tanh, logits, loss
# ---------------------------------------------------------------------------------------------------------
def mlp_params(vocab_size: int = 27, n_embd: int = 10, n_hidden: int = 64, block_size: int = 3, seed: int = 2147483647,
               dtype=torch.float64) -> dict[str, Tensor]:
    """The backprop notebook's parameters (with its small non-zero biases, so no gradient hides behind a zero)."""
    g = torch.Generator().manual_seed(seed)
    p = dict(
        C=torch.randn((vocab_size, n_embd), generator=g),
        W1=torch.randn((n_embd * block_size, n_hidden), generator=g) * (5 / 3) / ((n_embd * block_size) ** 0.5),
        b1=torch.randn(n_hidden, generator=g) * 0.1,
        W2=torch.randn((n_hidden, vocab_size), generator=g) * 0.1,
        b2=torch.randn(vocab_size, generator=g) * 0.1,
        bngain=torch.randn((1, n_hidden), generator=g) * 0.1 + 1.0,
        bnbias=torch.randn((1, n_hidden), generator=g) * 0.1,
    )
    return {k: v.to(dtype).requires_grad_() for k, v in p.items()}


def mlp_chain(p: dict[str, Tensor], Xb: Tensor, Yb: Tensor, eps: float = 1e-5) -> dict:
    emb = p["C"][Xb]
    embcat = emb.view(emb.shape[0], -1)
    hprebn = embcat @ p["W1"] + p["b1"]
    bn = batch_norm_chain(hprebn, p["bngain"], p["bnbias"], eps)
    h = torch.tanh(bn["hpreact"])
    logits = h @ p["W2"] + p["b2"]
    ce = cross_entropy_chain(logits, Yb)
    chain = dict(emb=emb, embcat=embcat, h=h, **bn, **ce)
    _retain(chain)
    return chain


def mlp_chain_backward(p: dict[str, Tensor], chain: dict, Xb: Tensor, Yb: Tensor, eps: float = 1e-5) -> dict:
    c = {k: v.detach() for k, v in chain.items()}
    P = {k: v.detach() for k, v in p.items()}
    d = cross_entropy_chain_backward(chain, Yb)
    dlogits = d["dlogits"]
    d["dh"] = dlogits @ P["W2"].T
    d["dW2"] = c["h"].T @ dlogits
    d["db2"] = dlogits.sum(0)
    d["dhpreact"] = (1.0 - c["h"] ** 2) * d["dh"]
    d.update(batch_norm_chain_backward(chain, d["dhpreact"], eps))
    d["dembcat"] = d["dhprebn"] @ P["W1"].T
    d["dW1"] = c["embcat"].T @ d["dhprebn"]
    d["db1"] = d["dhprebn"].sum(0)
    d["demb"] = d["dembcat"].view(c["emb"].shape)
    # dC: every row of emb came from C[Xb[k, j]], so its gradient is added back there (scatter-add)
    d["dC"] = torch.zeros_like(P["C"]).index_add_(0, Xb.reshape(-1), d["demb"].reshape(-1, P["C"].shape[1]))
    return d


# ---------------------------------------------------------------------------------------------------------
# RNN: the d2l chapter's rnn() step loop, and backprop through time by hand
# ---------------------------------------------------------------------------------------------------------
def rnn_chain(inputs: Tensor, h0: Tensor, W_xh: Tensor, W_hh: Tensor, b_h: Tensor | None,
              nonlinearity: str = "tanh") -> dict:
    """d2l's rnn(): for X in inputs: H = act(X @ W_xh + H @ W_hh + b_h), one step at a time.

    inputs: (T, B, I); W_xh: (I, H) and W_hh: (H, H), d2l's orientation (nn.RNN's weight_ih is W_xh.T).
    Returns hpreacts[t] and hs[t] (lists, one tensor per step; hs[-1] is h0 and hs[t] is step t's output).
    """
    act = torch.tanh if nonlinearity == "tanh" else torch.relu
    H = h0
    hpreacts, hs = [], []
    for X in inputs:
        hpreact = X @ W_xh + H @ W_hh
        if b_h is not None:
            hpreact = hpreact + b_h
        H = act(hpreact)
        hpreacts.append(hpreact)
        hs.append(H)
    for t in hpreacts + hs:
        if t.requires_grad:
            t.retain_grad()
    return dict(inputs=inputs, h0=h0, W_xh=W_xh, W_hh=W_hh, b_h=b_h, hpreacts=hpreacts, hs=hs,
                outputs=torch.stack(hs), nonlinearity=nonlinearity)


def rnn_chain_backward(chain: dict, doutputs: Tensor) -> dict:
    """Manual BPTT through rnn_chain, given d(loss)/d(h_t) from outside for every step (doutputs: (T, B, H)).

    Walking back from the last step, dh carries the gradient that h_t receives from step t+1:
      dhpreact_t = (doutputs[t] + dh) * act'(hpreact_t)
      dW_xh += X_t^T dhpreact_t,  dW_hh += h_{t-1}^T dhpreact_t,  db_h += sum_b dhpreact_t
      dX_t = dhpreact_t W_xh^T,   dh = dhpreact_t W_hh^T         (becomes dh for step t-1; at t = 0, dh0)
    """
    X = chain["inputs"].detach()
    W_xh, W_hh = chain["W_xh"].detach(), chain["W_hh"].detach()
    hs = [h.detach() for h in chain["hs"]]
    h0 = chain["h0"].detach()
    T = X.shape[0]
    dW_xh, dW_hh = torch.zeros_like(W_xh), torch.zeros_like(W_hh)
    db_h = torch.zeros(W_hh.shape[0], dtype=W_hh.dtype)
    dX = torch.zeros_like(X)
    dhpreacts = [None] * T
    dh = torch.zeros_like(h0)
    for t in reversed(range(T)):
        g = doutputs[t] + dh
        deriv = 1.0 - hs[t] ** 2 if chain["nonlinearity"] == "tanh" else (hs[t] > 0).to(g.dtype)
        dhpreact = g * deriv
        dhpreacts[t] = dhpreact
        h_prev = hs[t - 1] if t > 0 else h0
        dW_xh += X[t].T @ dhpreact
        dW_hh += h_prev.T @ dhpreact
        db_h += dhpreact.sum(0)
        dX[t] = dhpreact @ W_xh.T
        dh = dhpreact @ W_hh.T
    return dict(dW_xh=dW_xh, dW_hh=dW_hh, db_h=db_h, dinputs=dX, dh0=dh, dhpreacts=dhpreacts)


def _retain(chain: dict) -> None:
    for v in chain.values():
        if isinstance(v, Tensor) and v.requires_grad and not v.is_leaf:
            v.retain_grad()


# ---------------------------------------------------------------------------------------------------------
# The d2l character RNN "from scratch" (its chapter on recurrent networks): one-hot inputs, a Python loop over
# time steps, plain matmuls and F.relu / torch.tanh. The reference of mmops.models.TextRNN and the baseline of
# `bench --op text`.
# ---------------------------------------------------------------------------------------------------------
def d2l_rnn_params(vocab_size: int, num_hiddens: int, *, generator: torch.Generator | None = None,
                   dtype=torch.float32) -> dict[str, Tensor]:
    """The book's get_params: W_xh (V, H), W_hh (H, H), W_hq (H, V) drawn as randn * 0.01; b_h, b_q zeros.
    All require grad."""
    def normal(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype) * 0.01

    p = {"W_xh": normal(vocab_size, num_hiddens), "W_hh": normal(num_hiddens, num_hiddens),
         "b_h": torch.zeros(num_hiddens, dtype=dtype), "W_hq": normal(num_hiddens, vocab_size),
         "b_q": torch.zeros(vocab_size, dtype=dtype)}
    for t in p.values():
        t.requires_grad_(True)
    return p


def d2l_rnn(inputs: Tensor, state: Tensor, params: dict[str, Tensor], nonlinearity: str = "relu"
            ) -> tuple[Tensor, Tensor]:
    """The book's rnn(): inputs (T, B, V) one-hot rows, state (B, H). Returns the outputs of every step
    concatenated in time-major order, (T * B, V), and the last state."""
    act = F.relu if nonlinearity == "relu" else torch.tanh
    W_xh, W_hh, b_h, W_hq, b_q = (params[k] for k in ("W_xh", "W_hh", "b_h", "W_hq", "b_q"))
    H = state
    outputs = []
    for X in inputs:
        H = act(torch.mm(X, W_xh) + torch.mm(H, W_hh) + b_h)
        outputs.append(torch.mm(H, W_hq) + b_q)
    return torch.cat(outputs, dim=0), H


def d2l_rnn_loss(params: dict[str, Tensor], X: Tensor, Y: Tensor, state: Tensor | None,
                 nonlinearity: str = "relu") -> tuple[Tensor, Tensor]:
    """One minibatch of the book's train_epoch: X, Y token ids (T, B), time-major (the book's X.T and Y.T);
    the one-hot inputs, the step loop, and the cross-entropy averaged over every predicted character.
    state None starts from zeros (the book's begin_state). Returns (loss, last state)."""
    V, H = params["W_xh"].shape
    dtype = params["W_xh"].dtype
    if state is None:
        state = torch.zeros(X.shape[1], H, dtype=dtype)
    y_hat, state = d2l_rnn(F.one_hot(X, V).to(dtype), state, params, nonlinearity)
    return F.cross_entropy(y_hat, Y.reshape(-1)), state


def d2l_grad_clipping(params: list[Tensor], theta: float) -> None:
    """The book's grad_clipping: scale every gradient by theta / norm when the global norm exceeds theta."""
    norm = torch.sqrt(sum(torch.sum(p.grad**2) for p in params))
    if norm > theta:
        for p in params:
            p.grad[:] *= theta / norm
