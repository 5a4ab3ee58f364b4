"""The notebooks' training diagnostics as PNG files (matplotlib, headless).

loss.png             log10 of the training loss against the step, averaged over windows of steps
activations.png      histogram of each tanh layer's output, with mean, std and saturation (|h| > 0.97)
gradients.png        histogram of the gradient reaching each tanh layer's output
weight_grads.png     histogram of each 2-D weight's gradient, and the table of grad:data ratios
update_ratio.png     log10(lr * grad.std() / data.std()) of each 2-D weight against the step, with the 1e-3 guide

Layers are labelled as in the notebooks' legends ("layer 2 (Tanh)"): models give (label, module) pairs through
activation_layers(). matplotlib is a dependency of mmops.
"""
from __future__ import annotations

import os

import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _layer_outputs(model, X, Y, g):
    """One training-mode forward + backward on a batch, keeping each tanh layer's output and its gradient.
    BatchNorm's running statistics are restored afterwards (the probe must not train the model)."""
    labelled = list(model.activation_layers())
    layers = [m for _, m in labelled]
    outs = []

    def hook(_m, _inp, out):
        out = out[0] if isinstance(out, tuple) else out
        out.retain_grad()
        outs.append(out)

    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        ix = torch.randint(0, X.shape[0], (min(X.shape[0], 512),), generator=g, device=X.device)
        for p in model.parameters():
            p.grad = None
        model.train()
        model(X[ix], Y[ix]).backward()
    finally:
        for h in handles:
            h.remove()
        model.load_state_dict(buffers, strict=False)
    return [(label, o.detach().cpu(), o.grad.cpu()) for (label, _), o in zip(labelled, outs)]


def write_plots(out_dir: str, model, lossi: list[float], ud: list[torch.Tensor], ud_steps: list[int],
                weight_names: list[str], X, Y, g) -> list[str]:
    """Writes the five PNG files into out_dir (created if missing) and returns their paths. ud[k] holds the
    log10 update:data ratio of every weight in weight_names at step ud_steps[k]."""
    plt = _plt()
    os.makedirs(out_dir, exist_ok=True)
    paths = []

    def save(fig, name):
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)

    # loss curve
    fig, ax = plt.subplots(figsize=(7, 4))
    if lossi:
        t = torch.tensor(lossi).clamp_min(1e-12).log10()
        w = max(1, len(t) // 200)
        t = t[: len(t) // w * w].view(-1, w).mean(1)
        ax.plot(torch.arange(len(t)) * w, t)
        ax.set_ylabel(f"log10(training loss in nats), mean over {w} steps")
    ax.set_xlabel("step")
    ax.set_title("training loss (minibatch)")
    save(fig, "loss.png")

    layers = _layer_outputs(model, X, Y, g)
    for kind, idx in (("activations", 1), ("gradients", 2)):
        fig, ax = plt.subplots(figsize=(8, 4))
        legends = []
        for name, out, grad in layers:
            t = (out, grad)[idx - 1]
            hy, hx = torch.histogram(t.float().flatten(), bins=50, density=True)
            ax.plot(((hx[:-1] + hx[1:]) / 2).tolist(), hy.tolist())
            if kind == "activations":
                sat = (t.abs() > 0.97).float().mean() * 100
                legends.append(f"{name}: mean {t.mean():+.2f}, std {t.std():.2f}, saturated {sat:.2f}%")
            else:
                legends.append(f"{name}: mean {t.mean():+.2e}, std {t.std():.2e}")
        if legends:
            ax.legend(legends, fontsize=7)
        if kind == "activations":
            ax.set_xlabel("tanh output")
            ax.set_title("activation distribution of the tanh layers (one batch of 512)" if layers else
                         "activations: the model has no tanh layer")
        else:
            ax.set_xlabel("gradient of the loss at the tanh output")
            ax.set_title("gradient distribution at the tanh layers (one batch of 512)" if layers else
                         "gradients: the model has no tanh layer")
        ax.set_ylabel("density")
        save(fig, f"{kind}.png")

    # weight gradients: histogram and the grad:data table
    fig, (ax, tab) = plt.subplots(2, 1, figsize=(8, 6), gridspec_kw={"height_ratios": [3, 2]})
    rows = []
    for name, p in model.named_parameters():
        if p.dim() != 2 or p.grad is None:
            continue
        gr = p.grad.detach().cpu()
        hy, hx = torch.histogram(gr.float().flatten(), bins=50, density=True)
        ax.plot(((hx[:-1] + hx[1:]) / 2).tolist(), hy.tolist(), label=f"{name} {tuple(p.shape)}")
        rows.append([name, str(tuple(p.shape)), f"{gr.mean():+.2e}", f"{gr.std():.2e}",
                     f"{(gr.std() / p.detach().cpu().std()):.2e}"])
    if rows:
        ax.legend(fontsize=7)
    ax.set_xlabel("gradient of the loss at the weight entries")
    ax.set_ylabel("density")
    ax.set_title("weight gradient distribution (one batch of 512)")
    tab.axis("off")
    if rows:
        tab.table(cellText=rows, colLabels=["weight", "shape", "grad mean", "grad std", "grad:data"], loc="center")
    save(fig, "weight_grads.png")

    # update:data ratio over time
    fig, ax = plt.subplots(figsize=(8, 4))
    if ud:
        u = torch.stack(ud)
        for j, name in enumerate(weight_names):
            ax.plot(ud_steps, u[:, j].tolist(), label=name)
        ax.legend(fontsize=7)
    ax.axhline(-3, color="k", lw=1, ls="--", label="_1e-3 guide")  # the notebook's guide: updates ~1e-3 of the data
    ax.set_xlabel("step")
    ax.set_ylabel("log10(update std / data std)")
    ax.set_title("update:data ratio")
    save(fig, "update_ratio.png")
    return paths


def write_text_plots(out_dir: str, lossi: list[float], epochs: list[dict], batches_per_epoch: int) -> list[str]:
    """Text mode (`train --text`): loss.png, the minibatch loss against the step, and perplexity.png, the
    perplexity of every epoch (the book's training curve)."""
    plt = _plt()
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    if lossi:
        t = torch.tensor(lossi)
        w = max(1, len(t) // 200)
        t = t[: len(t) // w * w].view(-1, w).mean(1)
        ax.plot((torch.arange(len(t)) * w).tolist(), t.tolist())
        ax.set_ylabel(f"training loss, nats per character (mean over {w} steps)")
    ax.set_xlabel(f"step (minibatch; {batches_per_epoch} per epoch)")
    ax.set_title("training loss (cross-entropy per predicted character)")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "loss.png"))
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    if epochs:
        ax.plot([e["epoch"] for e in epochs], [e["perplexity"] for e in epochs], marker="." if len(epochs) < 50 else None)
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("perplexity, exp(mean loss) (log scale)")
    ax.set_title("perplexity per epoch" if epochs else "perplexity: the run did not complete an epoch")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "perplexity.png"))
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths
