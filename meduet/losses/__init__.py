"""MeDUET pretraining objectives and their composition.

``pretrain_losses`` runs one pretraining step's forward pass (method steps 1-7) for a
student ``MeduetModel`` and its EMA teacher and returns every loss term plus the total:

    L = L_rec + lambda1 (L_dc + L_ds) + lambda2 L_MFTD + lambda3 L_SiQC
        [+ clean_adversary (L_dc,clean + L_ds,clean) + decorrelation L_corr + site_alignment L_align]

The bracketed terms are this project's (``meduet.losses.site_free``; ``pretrain.method``).

The modules hold the pieces: ``mixing`` (token mixing, demixing, dual reconstruction),
``domain`` (gradient reversal, site classification), ``mftd`` and ``siqc``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch.profiler import record_function

from meduet.losses.domain import domain_losses
from meduet.losses.mftd import mftd_loss
from meduet.losses.mixing import (
    check_mask,
    encode_demix,
    fuse,
    random_mix_mask,
    reconstruction_loss,
)
from meduet.losses.siqc import siqc_loss, view_embeddings
from meduet.losses.site_free import (
    SiteMeanQueue,
    clean_site_losses,
    cross_correlation,
    pool_groups,
)
from meduet.models.meduet import MeduetModel


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms (the paper's defaults).

    Args:
        domain: ``lambda1`` on ``L_dc + L_ds``.
        mftd: ``lambda2`` on ``L_MFTD``.
        siqc: ``lambda3`` on ``L_SiQC``.
        mftd_content: ``lambda_c``, the content share inside ``L_MFTD``.
        grl_lambda: gradient reversal strength of the content site classifier.
        clean_adversary: weight of the site losses on volume-pooled clean factors.
        decorrelation: weight of the pooled content/style cross-correlation.
        site_alignment: weight of the per-site spread of pooled content (needs a queue).
    """

    domain: float = 0.2
    mftd: float = 0.5
    siqc: float = 0.3
    mftd_content: float = 0.5
    grl_lambda: float = 1.0
    clean_adversary: float = 0.0
    decorrelation: float = 0.0
    site_alignment: float = 0.0

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value < 0:
                raise ValueError(f"loss weight {name} must be non-negative, got {value}")


def pretrain_losses(student: MeduetModel, teacher: MeduetModel, x: torch.Tensor, domain: torch.Tensor, *,
                    mask: torch.Tensor | None = None, weights: LossWeights = LossWeights(),
                    use_mftd: bool = True, use_siqc: bool = True,
                    generator: torch.Generator | None = None, groups: torch.Tensor | None = None,
                    site_queue: SiteMeanQueue | None = None, same_site_negatives: bool = False,
                    clean_crops: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """All MeDUET pretraining losses for one batch.

    Args:
        student: the trained model.
        teacher: its EMA copy (no gradients flow into it); see ``meduet.engine.ema``.
        x: clean latent crops ``(B, C, d, h, w)``, ``B`` even (sample ``i`` mixes with ``B-1-i``).
        domain: ``(B,)`` integer site labels.
        mask: ``(B, N)`` bool mixing mask (``True`` = partner token); drawn at random if omitted.
        weights: loss weights.
        use_mftd: add MFTD (the authors switch it on after 20 % of training).
        use_siqc: add SiQC (needs mixing ratio 0.5, so both sources have ``N/2`` tokens).
        generator: random source for the mask.
        groups: ``(B,)`` volume slot of each crop (crops of one volume pool together); None:
            every crop its own volume.
        site_queue: the queue ``weights.site_alignment`` needs.
        same_site_negatives: SiQC content negatives from the query's site only.
        clean_crops: ``(B, C, d, h, w)`` the crops the site-free terms encode (the unaugmented
            ``x``, oriented as evaluation reads volumes); None: ``x``.

    Returns:
        scalars ``rec``, ``domain_content``, ``domain_style``, ``mftd``, ``siqc``,
        ``clean_content``, ``clean_style``, ``decorrelation``, ``site_alignment`` (zero when
        switched off) and ``total``.
    """
    cfg = student.config
    batch = x.shape[0]
    if mask is None:
        mask = random_mix_mask(batch, cfg.num_tokens, cfg.mask_ratio, device=x.device, generator=generator)
    check_mask(mask, cfg.mask_ratio)

    # The teacher's targets depend only on x and the mask: computing them first keeps their
    # transient activations from adding to the student's stored ones.
    teacher_out: dict[str, torch.Tensor] = {}
    if use_mftd or use_siqc:
        with torch.no_grad():
            teacher_out = _teacher_targets(teacher, x, mask, use_mftd=use_mftd, use_siqc=use_siqc)

    # Steps 1-2: mix, encode, demix into factors.
    with record_function("student: encode mixed"):
        demixed = encode_demix(student, x, mask)
        fused = [fuse(student, demixed, mask)]  # (B, N, E) factual remix
        if use_siqc:
            fused.append(fuse(student, demixed, mask, swap_style=True))  # views (c1, s2) and (c2, s1)

    # Step 3: every decoder pass of this step in ONE call: (views * 2 passes * B) sequences.
    views = len(fused)
    with record_function("student: decode dual"):
        pred = student.decode_dual(torch.cat(fused), demixed.cls.repeat(views, 1, 1), mask.repeat(views, 1))
    pred = rearrange(pred, "(two v b) n p -> v (two b) n p", two=2, v=views)  # v=0 factual, v=1 swapped
    losses = {"rec": reconstruction_loss(pred[0], x, mask, patch_size=cfg.patch_size, norm_pix=cfg.norm_pix_loss)}

    # Step 4: site supervision of both sources' factors.
    losses["domain_content"], losses["domain_style"] = domain_losses(student, demixed, domain,
                                                                     grl_lambda=weights.grl_lambda)

    # Steps 5-6 re-encode decoded latents, and the project's terms encode the clean crops:
    # one student encoder call for all of them.
    clean = weights.clean_adversary > 0 or weights.decorrelation > 0 or weights.site_alignment > 0
    to_encode = [x if clean_crops is None else clean_crops] if clean else []
    to_encode += [student.unpatchify(pred[0])] if use_mftd else []
    to_encode += [student.unpatchify(pred[1])] if use_siqc else []
    if to_encode:
        with record_function("student: re-encode"):
            encoded_content, encoded_style, _ = student.encode_full(torch.cat(to_encode))
        if clean:
            clean_content, clean_style = encoded_content[:batch], encoded_style[:batch]  # (B, N, E), (B, N, S)
            encoded_content, encoded_style = encoded_content[batch:], encoded_style[batch:]
        re_content, re_style = encoded_content.split(2 * batch), encoded_style.split(2 * batch)  # per view

    zero = x.new_zeros(())
    losses["mftd"] = zero
    if use_mftd:
        losses["mftd"] = mftd_loss(re_content[0], re_style[0], teacher_out["content"], teacher_out["style"], mask,
                                   content_weight=weights.mftd_content)

    losses["siqc"] = zero
    if use_siqc:
        swapped_c, swapped_s = re_content[-1].chunk(2), re_style[-1].chunk(2)  # (c1,s2) rows, then (c2,s1)
        query_c, query_s = view_embeddings(
            [demixed.content_own, demixed.content_partner, *swapped_c],
            [demixed.style_own, demixed.style_partner, *swapped_s])
        losses["siqc"] = siqc_loss(query_c, query_s, teacher_out["key_content"], teacher_out["key_style"],
                                   student.logit_scale_content, student.logit_scale_style,
                                   domain=domain if same_site_negatives else None, groups=groups)

    # The project's site-free terms on the clean encoding.
    slots = groups if groups is not None else torch.arange(batch, device=x.device)
    losses["clean_content"], losses["clean_style"] = zero, zero
    if weights.clean_adversary > 0:
        losses["clean_content"], losses["clean_style"] = clean_site_losses(
            student, clean_content, clean_style, domain, slots, weights.grl_lambda)
    losses["decorrelation"] = (cross_correlation(pool_groups(clean_content.mean(1), slots),
                                                 pool_groups(clean_style.mean(1), slots))
                               if weights.decorrelation > 0 else zero)
    losses["site_alignment"] = zero
    if weights.site_alignment > 0:
        if site_queue is None:
            raise ValueError("weights.site_alignment > 0 needs a site_queue")
        losses["site_alignment"] = site_queue(clean_content, domain)

    # Step 7.
    losses["total"] = (losses["rec"] + weights.domain * (losses["domain_content"] + losses["domain_style"])
                       + weights.mftd * losses["mftd"] + weights.siqc * losses["siqc"]
                       + weights.clean_adversary * (losses["clean_content"] + losses["clean_style"])
                       + weights.decorrelation * losses["decorrelation"]
                       + weights.site_alignment * losses["site_alignment"])
    return losses


def _teacher_targets(teacher: MeduetModel, x: torch.Tensor, mask: torch.Tensor, *, use_mftd: bool,
                     use_siqc: bool) -> dict[str, torch.Tensor]:
    """Teacher tokens of the clean batch (MFTD) and teacher view keys on the mask ``1 - M`` (SiQC).

    The clean batch and the teacher's two swapped reconstructions share one encoder call.
    """
    batch = x.shape[0]
    to_encode = [x] if use_mftd else []
    if use_siqc:
        complement = ~mask
        with record_function("teacher: encode mixed"):
            demixed = encode_demix(teacher, x, complement)
        with record_function("teacher: decode swapped"):
            swapped = teacher.decode_dual(fuse(teacher, demixed, complement, swap_style=True), demixed.cls,
                                          complement)
        to_encode.append(teacher.unpatchify(swapped))  # (2B, C, d, h, w): views (c1,s2), (c2,s1)
    with record_function("teacher: encode clean + swapped"):
        content, style, _ = teacher.encode_full(torch.cat(to_encode))
    out: dict[str, torch.Tensor] = {}
    if use_mftd:
        out["content"], out["style"] = content[:batch], style[:batch]  # (B, N, E), (B, N, S)
    if use_siqc:
        swapped_c, swapped_s = content[-2 * batch:].chunk(2), style[-2 * batch:].chunk(2)
        out["key_content"], out["key_style"] = view_embeddings(
            [demixed.content_own, demixed.content_partner, *swapped_c],
            [demixed.style_own, demixed.style_partner, *swapped_s])
    return out


__all__ = ["LossWeights", "pretrain_losses"]
