"""The U-shaped flow against the official graph, a brute-force log-determinant, the loss and the likelihood map."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vad_flows.likelihood import log_det_by_jacobian
from vad_uflow.network import UShapedFlow, check_scales, latent_channels, likelihood_map, stage_channels, uflow_loss

CHANNELS, SIZES = [2, 8, 8], [(8, 8), (4, 4), (2, 2)]


def randomized(flow: UShapedFlow, scale: float = 0.1) -> UShapedFlow:
    """Random trainable weights everywhere (FrEIA starts near the identity)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in flow.parameters():
            if parameter.requires_grad:
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return flow


def features(batch: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, h, w, generator=generator) for c, (h, w) in zip(CHANNELS, SIZES)]


def official_graph(channels, sizes, flow_steps):
    """The official ``UFlow.__init__`` flow graph (github.com/mtailanian/uflow, src/model.py), transcribed."""
    from FrEIA import framework as ff
    from FrEIA import modules as fm

    def subnet(kernel_size):
        def build(in_channels, out_channels):
            mid = int(in_channels * 1.0)
            return nn.Sequential(nn.Conv2d(in_channels, mid, kernel_size, padding="same"), nn.ReLU(), nn.Conv2d(mid, out_channels, kernel_size, padding="same"))

        return build

    def stage(in_node):
        flow_size = in_node.output_dims[0][-1]
        nodes = []
        for step in range(flow_steps):
            params = {"subnet_constructor": subnet(3 if step % 2 == 0 else 1), "affine_clamping": 2.0, "permute_soft": False}
            nodes.append(ff.Node(in_node, fm.AllInOneBlock, params, name=f"flow{flow_size}_step{step}"))
            in_node = nodes[-1]
        return nodes

    input_nodes = [ff.InputNode(c, h, w, name=f"cond_{c}") for c, (h, w) in zip(channels, sizes)]
    nodes, output_nodes = [], []
    last_node = input_nodes[-1]
    for i in reversed(range(1, len(input_nodes))):
        flows = stage(last_node)
        volume_size = flows[-1].output_dims[0][0]
        split = ff.Node(flows[-1], fm.Split, {"section_sizes": (volume_size // 8 * 4, volume_size - volume_size // 8 * 4), "dim": 0}, name=f"split_{i + 1}")
        output = ff.OutputNode(split.out1, name=f"output_scale_{i + 1}")
        up = ff.Node(split.out0, fm.IRevNetUpsampling, {}, name=f"up_{i + 1}")
        last_node = ff.Node([input_nodes[i - 1].out0, up.out0], fm.Concat, {"dim": 0}, name=f"cat_{i}")
        output_nodes.append(output)
        nodes.extend([*flows, split, up, last_node])
    flows = stage(last_node)
    output_nodes.append(ff.OutputNode(flows[-1], name="output_scale_1"))
    nodes.extend(flows)
    return ff.GraphINN(input_nodes + nodes + output_nodes[::-1])


def test_the_u_matches_the_official_graph_with_the_same_weights():
    ours = randomized(UShapedFlow(CHANNELS, SIZES, flow_steps=3))
    graph = official_graph(CHANNELS, SIZES, flow_steps=3)
    copied = 0
    for node in graph.node_list:
        if node.name.startswith("flow"):
            size, step = node.name[len("flow") :].split("_step")
            scale = [w for _, w in SIZES].index(int(size))
            node.module.load_state_dict(ours.stages[scale].module_list[int(step)].state_dict())
            copied += 1
    assert copied == 3 * 3
    x = features(2)
    normalized = ours.normalize(x)
    latents, log_det = ours.flow(normalized)
    official, official_log_det = graph(normalized)
    assert [tuple(z.shape) for z in latents] == [tuple(z.shape) for z in official] == [(2, 3, 8, 8), (2, 5, 4, 4), (2, 4, 2, 2)]
    for z, expected in zip(latents, official):
        torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(log_det, official_log_det, rtol=1e-5, atol=1e-4)
    assert log_det.abs().min() > 0.1  # not the identity


def test_log_det_matches_the_brute_force_jacobian():
    flow = randomized(UShapedFlow(CHANNELS, SIZES, flow_steps=2), scale=0.2)
    x = flow.normalize(features(2, seed=3))
    shapes = [t.shape[1:] for t in x]
    sizes = [s.numel() for s in shapes]

    def as_latents(flat: torch.Tensor) -> torch.Tensor:
        parts = [part.view(1, *shape) for part, shape in zip(flat.split(sizes), shapes)]
        return torch.cat([z.flatten() for z in flow.flow(parts)[0]])

    _, log_det = flow.flow(x)
    for i in range(2):
        sample = torch.cat([t[i].flatten() for t in x]).detach()
        expected = log_det_by_jacobian(as_latents, sample)
        assert log_det[i].item() == pytest.approx(expected.item(), abs=2e-3)
    assert abs(log_det[0].item()) > 1


def test_pixel_shuffle_is_freias_irevnet_upsampling():
    from FrEIA import modules as fm

    x = torch.randn(2, 8, 3, 5)
    (expected,), _ = fm.IRevNetUpsampling([(8, 3, 5)])([x])
    torch.testing.assert_close(F.pixel_shuffle(x, 2), expected, rtol=0, atol=0)


def test_stage_and_latent_channels():
    # lite0 blocks.1/2/4: 112 -> 56 kept, 56 up (14 after upsampling); 40 + 14 = 54 -> 30 kept, 24 up (6); 24 + 6 = 30
    assert stage_channels([24, 40, 112]) == [30, 54, 112]
    assert latent_channels([24, 40, 112]) == [30, 30, 56]
    # the official README's MS-CaiT sizes: 816 = 768 + 384 / 2 / 4 and 192 = 384 / 2
    assert latent_channels([768, 384]) == [816, 192]
    # every latent entry is kept exactly once (the flow keeps the dimension)
    flow = UShapedFlow(CHANNELS, SIZES, flow_steps=1)
    latents, _ = flow(features(1))
    assert sum(z.numel() for z in latents) == sum(t.numel() for t in features(1))


def test_layer_norms_cover_each_whole_feature_map_and_train():
    flow = UShapedFlow(CHANNELS, SIZES, flow_steps=1)
    assert [tuple(norm.normalized_shape) for norm in flow.norms] == [(2, 8, 8), (8, 4, 4), (8, 2, 2)]
    assert all(norm.weight.requires_grad and norm.weight.shape == norm.normalized_shape for norm in flow.norms)
    normalized = flow.normalize([3 + 5 * t for t in features(2)])
    for t in normalized:
        assert t.flatten(1).mean(1).abs().max() < 1e-5 and (t.flatten(1).std(1, unbiased=False) - 1).abs().max() < 1e-3


def test_bad_scales_are_refused():
    with pytest.raises(ValueError, match="twice the size"):
        check_scales([8, 8], [(8, 8), (3, 3)])
    with pytest.raises(ValueError, match="at least 8"):
        check_scales([4, 4], [(4, 4), (2, 2)])
    with pytest.raises(ValueError, match="one size per scale"):
        check_scales([8, 8], [(4, 4)])


def test_loss_is_the_official_one():
    latents = [torch.randn(3, 2, 4, 4), torch.randn(3, 5, 2, 2)]
    log_det = torch.randn(3)
    # official train.py: lpz = sum_s 0.5 * sum(z_s^2); loss = mean(lpz - ljd)
    lpz = torch.sum(torch.stack([0.5 * torch.sum(z**2, dim=(1, 2, 3)) for z in latents]), dim=0)
    torch.testing.assert_close(uflow_loss(latents, log_det), torch.mean(lpz - log_det))


def test_likelihood_map_is_one_minus_the_official_probability():
    latents = [torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4), torch.zeros(2, 4, 2, 2)]
    probabilities = []  # official UFlow.get_probability
    for output in latents:
        prob = torch.exp(-torch.mean(output**2, dim=1, keepdim=True) * 0.5)
        probabilities.append(F.interpolate(prob, size=[16, 16], mode="bilinear", align_corners=False))
    expected = 1 - torch.mean(torch.stack(probabilities, dim=-1), dim=-1)[:, 0]
    torch.testing.assert_close(likelihood_map(latents, (16, 16)), expected)
    assert likelihood_map([torch.zeros(1, 3, 4, 4)], (8, 8)).abs().max() == 0  # z = 0: the most likely
