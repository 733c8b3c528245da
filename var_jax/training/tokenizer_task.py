"""The tokenizer task for the shared loop (`training/loop.py`): the multi-scale VQVAE that
`python -m var_jax.train_tokenizer` trains (`run`), also the first phase of a VAR run that sets
`config.tokenizer.train` (`train`, called by `var_task.run`).

The VQGAN recipe on VAR's quantizer, `train_step` (x an image, x' its reconstruction, f the
encoder output, f_hat_k the quantizer's cumulative output after scale k, W the decoder's last conv):
    L_rec = l1 mean|x - x'| + l2 mean (x - x')^2 + lpips LPIPS(x, x')
    L_vq  = mean_k [beta ||sg(f_hat_k) - f||^2 + ||f_hat_k - sg(f)||^2]        (official training forward)
    L     = L_rec + vq L_vq + [step >= gan_start] gan w_adapt (-mean D(x'))      (hinge generator loss)
    w_adapt = ||dL_rec/dW|| / (||d(-D(x'))/dW|| + 1e-4)                          (VQGAN, `adaptive_weight`)
    L_D   = (mean relu(1 - D(x)) + mean relu(1 + D(sg(x')))) / 2                (the PatchGAN)

Codebook health (`_codebook_health`): the official EMA of per-scale code hits, logged as usage %;
every `reseed_every` steps the codes hit less than `dead_threshold` x the uniform rate are re-seeded
from this batch's encoder residuals (random pooled vectors of random scales), so that no scale
collapses onto a few codes. Evaluation: held-out PSNR / LPIPS and a reconstruction grid.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx

from var_jax.data.pipeline import make_dataset
from var_jax.io import checkpoint
from var_jax.models import VQVAE, VQVAEConfig, abstract
from var_jax.models.perceptual import PatchDiscriminator, load_lpips_params, lpips
from var_jax.parallel import distributed
from var_jax.training import configs, loop
from var_jax.utils import viz


def _conv(h, kernel, bias):
    k = kernel.shape[0] // 2
    out = jax.lax.conv_general_dilated(h, kernel.astype(h.dtype), (1, 1), ((k, k), (k, k)),
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return (out + bias.astype(out.dtype)).astype(jnp.float32)


def psnr(x, y) -> jax.Array:
    """Per-image PSNR in dB for images in [-1, 1] (computed on [0, 1])."""
    mse = jnp.mean(((x - y) / 2) ** 2, axis=(1, 2, 3))
    return 10 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10))


# ---------------------------------------------------------------------------- the task
def model_config(config) -> VQVAEConfig:
    """The VQVAE of a tokenizer config, which must work on the config's image size."""
    vq_cfg = configs.vqvae_model_config(config.model)
    if config.data.image_size != vq_cfg.image_size:
        raise ValueError(f'config.data.image_size {config.data.image_size} does not match the tokenizer '
                         f'({vq_cfg.image_size}px = patch_nums[-1] {vq_cfg.patch_nums[-1]} x '
                         f'downsampling {vq_cfg.downsample})')
    return vq_cfg


def build(config, source=None, *, workdir=None, lpips_params=None) -> loop.Task:
    """The tokenizer task of `config` for the loop. `source` (the training data) is not needed;
    `workdir`: where the reconstruction grids go; `lpips_params`: the LPIPS network when
    `loss.lpips` > 0 (`load_lpips_params(config.loss.lpips_weights)`)."""
    del source
    vq_cfg = model_config(config)
    loss = config.loss
    use_gan = loss.gan > 0
    vq_graphdef = nnx.split(abstract(vq_cfg))[0]
    disc_graphdef = nnx.split(nnx.eval_shape(
        lambda: PatchDiscriminator(loss.disc_ch, loss.disc_layers, rngs=nnx.Rngs(0))))[0]
    return loop.Task(
        name='tokenizer',
        model_configs={'vqvae': vq_cfg, 'var': None},
        optimizer=functools.partial(make_optimizer, config),
        init_params=functools.partial(init_params, config, vq_cfg),
        train_step=functools.partial(train_step, config=config, vq_cfg=vq_cfg, vq_graphdef=vq_graphdef,
                                     disc_graphdef=disc_graphdef if use_gan else None,
                                     use_lpips=lpips_params is not None),
        batch_spec=loop.image_batch_spec(config.batch_size, config.data.image_size),
        frozen=lpips_params,
        export=('vqvae',),
        ema_decay=float(loss.ema),
        pretrained=functools.partial(pretrained, config, vq_cfg),
        evaluate=functools.partial(evaluate, config=config, vq_graphdef=vq_graphdef, lpips_params=lpips_params,
                                   workdir=workdir),
        progress_fields=progress_fields)


def make_optimizer(config, total_steps: int, steps_per_epoch: float):
    """AdamW (warm-up, then cosine or constant) for the VQVAE; Adam for the discriminator."""
    o = config.optim
    warm = max(1, min(o.warmup_steps, total_steps // 2))
    if o.sched == 'cos':
        lr = optax.warmup_cosine_decay_schedule(0.0, o.lr, warm, max(total_steps, warm + 1), o.lr * 0.01)
    else:
        lr = optax.join_schedules([optax.linear_schedule(0.0, o.lr, warm), optax.constant_schedule(o.lr)], [warm])
    g = optax.inject_hyperparams(optax.adamw)(learning_rate=lr, b1=o.b1, b2=o.b2, weight_decay=o.wd)
    if o.clip > 0:
        g = optax.chain(optax.clip_by_global_norm(o.clip), g)
    if not config.loss.gan > 0:
        return g
    d = optax.adam(o.disc_lr, b1=o.b1, b2=o.b2)
    return optax.multi_transform({'g': g, 'd': d}, {'vqvae': 'g', 'disc': 'd'})


def init_params(config, vq_cfg: VQVAEConfig, key):
    k_vq, k_d = jax.random.split(key)
    params = {'vqvae': nnx.state(VQVAE(vq_cfg, rngs=nnx.Rngs(k_vq)), nnx.Param)}
    if config.loss.gan > 0:
        loss = config.loss
        params['disc'] = nnx.state(PatchDiscriminator(loss.disc_ch, loss.disc_layers, rngs=nnx.Rngs(k_d)),
                                   nnx.Param)
    sn, v = vq_cfg.num_scales, vq_cfg.vocab_size
    return params, {'usage': jnp.zeros((sn, v), jnp.float32)}


def pretrained(config, vq_cfg: VQVAEConfig) -> dict:
    """config.init_from: the weights of a tokenizer of the same architecture (fine-tuning), or {}."""
    if not config.init_from:
        return {}
    vq, _ = checkpoint.load_model(config.init_from, tokenizer_only=True)
    if vq.config.replace(dtype=vq_cfg.dtype) != vq_cfg:
        raise ValueError(f'config.init_from {config.init_from} holds a different tokenizer '
                         f'({vq.config}); set config.model to match it')
    return {'vqvae': nnx.state(vq, nnx.Param)}


# ---------------------------------------------------------------------------- update
def train_step(state, batch, frozen, tx, *, config, vq_cfg: VQVAEConfig, vq_graphdef, disc_graphdef,
               use_lpips: bool):
    """`disc_graphdef`: the PatchGAN's, or None without the GAN loss; `frozen`: the LPIPS network."""
    loss_cfg = config.loss
    use_gan = disc_graphdef is not None
    x = loop.images_to_float(batch['image'])
    gan_on = (state.step >= loss_cfg.gan_start).astype(jnp.float32) if use_gan else 0.0
    key = state.key()

    def rec_loss(rec):
        out = loss_cfg.l1 * jnp.mean(jnp.abs(x - rec)) + loss_cfg.l2 * jnp.mean((x - rec) ** 2)
        if use_lpips:
            out = out + loss_cfg.lpips * jnp.mean(lpips(frozen, x, rec))
        return out

    def gen_loss(vq_params, disc_params):
        vq = nnx.merge(vq_graphdef, vq_params)
        f_st, vq_loss, aux = vq.quantize(vq.encode(x))
        h = vq.decoder.features(vq.post_quant_conv(f_st.astype(jnp.float32)))
        w, b = vq.decoder.conv_out.kernel[...], vq.decoder.conv_out.bias[...]
        rec = _conv(h, w, b)
        l_rec = rec_loss(rec)
        total = l_rec + loss_cfg.vq * vq_loss
        m = {'L_rec': l_rec, 'L_vq': vq_loss}
        if use_gan:
            disc = nnx.merge(disc_graphdef, jax.lax.stop_gradient(disc_params))
            l_g = -jnp.mean(disc(rec))
            weight = loss_cfg.gan
            if loss_cfg.adaptive_weight:  # VQGAN: balance the two gradients at the last layer
                hs = jax.lax.stop_gradient(h)
                g_rec = jax.grad(lambda k: rec_loss(_conv(hs, k, b)))(w)
                g_gan = jax.grad(lambda k: -jnp.mean(disc(_conv(hs, k, b))))(w)
                adapt = jnp.clip(jnp.linalg.norm(g_rec) / (jnp.linalg.norm(g_gan) + 1e-4), 0, 1e4)
                weight = weight * jax.lax.stop_gradient(adapt)
                m['gan_weight'] = weight
            total = total + gan_on * weight * l_g
            m['L_G'] = l_g
        return total, (rec, aux, m)

    grad_vq = jax.value_and_grad(gen_loss, has_aux=True)
    (loss, (rec, aux, m)), g_vq = grad_vq(state.params['vqvae'], state.params.get('disc'))
    grads = {'vqvae': g_vq}
    if use_gan:
        rec_sg = jax.lax.stop_gradient(rec)

        def disc_loss(disc_params):
            disc = nnx.merge(disc_graphdef, disc_params)
            real, fake = disc(x), disc(rec_sg)
            return 0.5 * (jnp.mean(jax.nn.relu(1 - real)) + jnp.mean(jax.nn.relu(1 + fake))), (real, fake)

        (l_d, (real, fake)), g_d = jax.value_and_grad(disc_loss, has_aux=True)(state.params['disc'])
        grads['disc'] = jax.tree.map(lambda g: g * gan_on, g_d)
        m.update(L_D=l_d, D_real=jnp.mean(real), D_fake=jnp.mean(fake))
    params, opt_state, gnorm = loop.apply_updates(state, grads, tx)
    usage, params, n_reseed = _codebook_health(config.codebook, vq_cfg, vq_graphdef, state, params, aux, key)
    m.update(loss=loss, grad_norm=gnorm, psnr=jnp.mean(psnr(x, jnp.clip(rec, -1, 1))),
             usage=_usage_pct(vq_cfg, usage, x.shape[0]), reseeded=n_reseed, skipped=jnp.sum(batch['skipped']),
             perplexity=_perplexity(aux['hits']))
    return state.replace(params=params, opt_state=opt_state, extra={'usage': usage}), m


def _usage_pct(vq_cfg: VQVAEConfig, usage, batch):
    """Official measure: % of codes whose EMA hit count is >= 8 % of the uniform share of the
    full-resolution latent positions, per scale."""
    s = vq_cfg.latent_size
    margin = batch * s * s / vq_cfg.vocab_size * 0.08
    return jnp.mean(usage >= margin, axis=1) * 100


def _perplexity(hits):
    p = hits / jnp.maximum(jnp.sum(hits, axis=1, keepdims=True), 1)
    return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(p), 0.0), axis=1))


def _codebook_health(cb, vq_cfg: VQVAEConfig, vq_graphdef, state, params, aux, key):
    """Official EMA of code hits (first record copied, 0.9/0.1 for < 100 records, then
    0.99/0.01; a record per scale) and dead-code re-seeding (`cb`: config.codebook)."""
    sn = vq_cfg.num_scales
    usage = state.extra['usage']
    rows = []
    for si in range(sn):
        r = state.step * sn + si
        hit = aux['hits'][si]
        rows.append(jnp.where(r == 0, hit, jnp.where(r < 100, 0.9 * usage[si] + 0.1 * hit,
                                                     0.99 * usage[si] + 0.01 * hit)))
    usage = jnp.stack(rows)
    if not cb.reseed:
        return usage, params, jnp.zeros((), jnp.int32)
    v = vq_cfg.vocab_size
    tokens_per_step = sum(int(np.prod(z.shape[:-1])) for z in aux['z'])
    rate = jnp.sum(usage, 0) / (tokens_per_step / v)  # hits relative to a uniform codebook
    # step 0 included: the first batch re-seeds every unused code from encoder outputs (a
    # data-dependent codebook init, instead of the tiny U(-1/V, 1/V) start)
    due = state.step % cb.reseed_every == 0
    dead = due & (rate < cb.dead_threshold)
    pool = jnp.concatenate([z.reshape(-1, z.shape[-1]) for z in aux['z']], 0)
    pick = jax.random.randint(jax.random.fold_in(key, 7), (v,), 0, pool.shape[0])
    vq = nnx.merge(vq_graphdef, params['vqvae'])
    emb = vq.quantize.embedding.embedding
    emb[...] = jnp.where(dead[:, None], jax.lax.stop_gradient(pool[pick]), emb[...])
    usage = jnp.where(dead[None, :], tokens_per_step / v / sn, usage)
    return usage, {**params, 'vqvae': nnx.state(vq, nnx.Param)}, jnp.sum(dead).astype(jnp.int32)


def progress_fields(m: dict) -> dict:
    out = {k: m[k] for k in ('L_rec', 'L_vq', 'psnr', 'grad_norm') if k in m}
    usage = [m[k] for k in sorted(m) if k.startswith('usage/')]
    if usage:
        out['usage%'] = '/'.join(f'{u:.0f}' for u in usage)
    return out


# ---------------------------------------------------------------------------- evaluation
def evaluate(state, frozen, step, writer, final, *, config, vq_graphdef, lpips_params, workdir) -> dict:
    """Held-out PSNR / LPIPS and a grid: input | reconstruction | cumulative per-scale ones."""
    data = config.data
    n_batches = int(config.get('eval_batches', 4))
    it, _ = make_dataset(data, split='eval', local_batch=min(config.batch_size, 64), seed=0, train=False)
    vq = nnx.merge(vq_graphdef, state.ema.get('vqvae', state.params['vqvae']))
    recon = nnx.jit(lambda m, x: m.decode(m.quantize.tokenize(m.encode(x))[1]))
    psnrs, lp, first = [], [], None
    for i, b in enumerate(it):
        if i >= n_batches:
            break
        x = loop.images_to_float(jnp.asarray(b['image']))
        r = recon(vq, x)
        psnrs.append(np.asarray(psnr(x, r)))
        if lpips_params is not None:
            lp.append(np.asarray(jax.jit(lpips)(lpips_params, x, r)))
        if first is None:
            first = x[:8]
    out = {'eval/psnr': float(np.mean(np.concatenate(psnrs)))}
    if lp:
        out['eval/lpips'] = float(np.mean(np.concatenate(lp)))
    if jax.process_index() == 0:
        writer.scalars(step, out)
        x = first
        steps = nnx.jit(lambda m, x: [m.decode(f) for f in
                                       m.quantize.idx_to_fhat(m.quantize.tokenize(m.encode(x))[0], cumulative=True)])
        cols = [x, recon(vq, x)] + list(steps(vq, x))
        tiles = np.stack([np.asarray(c) for c in cols], 1).reshape((-1,) + x.shape[1:])
        g = viz.grid((tiles + 1) / 2, x.shape[0], len(cols))
        viz.save_png(epath.Path(workdir) / 'recon' / f'step_{step:07d}.png', g)
        writer.image(step, 'reconstructions', g)
    return out


# ---------------------------------------------------------------------------- the command
def builder(config, workdir) -> loop.Build:
    """`build` with what is read once per run (the LPIPS network; the image size checked first)."""
    model_config(config)
    lpips_params = load_lpips_params(config.loss.lpips_weights) if config.loss.lpips > 0 else None
    return functools.partial(build, workdir=workdir, lpips_params=lpips_params)


def run(config, workdir, *, dry_run: bool = False, device_memory_gib: float = 0.0) -> dict:
    """Train the tokenizer of `config` into `workdir` (resuming); returns final metrics. `dry_run`:
    compile only and report the memory (`loop.dry_run_report`)."""
    configs.check(config, 'tokenizer')
    configs.check_workdir(workdir)
    distributed.maybe_initialize()  # before the task builds anything on the backend
    workdir = checkpoint.abspath(workdir)
    if dry_run:  # abstract shapes only: no data, nothing written
        return loop.dry_run_report(config, builder(config, workdir), device_memory_gib=device_memory_gib)
    return train(config, workdir)


def train(config, workdir) -> dict:
    """`run` in a process already set up (config and workdir checked, `workdir` absolute, the
    backend initialised): the first phase of `var_task.run`. A config or data error leaves no
    workdir behind."""
    with configs.fresh_workdir_guard(workdir):
        return loop.train(config, workdir, builder(config, workdir)).metrics
