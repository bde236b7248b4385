"""pkwrap.nn.SpecAugment: Kaldi's spec-augment-layer semantics (freq + time masks)."""
import pytest
import torch

from pkwrap.nn import SpecAugment, TDNNFModel
from pkwrap.nn.spec_augment import spec_augment_freq_mask, spec_augment_time_mask

torch.set_num_threads(1)


def test_freq_mask_is_one_contiguous_wrapping_band_up_to_the_max():
    g = torch.Generator().manual_seed(0)
    d, p = 40, 0.5
    m = spec_augment_freq_mask(2000, d, p, generator=g)
    zeros = (m == 0).sum(1)
    assert zeros.max().item() == int(d * p + 0.5) and zeros.min().item() == 0
    # widths uniform in {0..20}: each width about 1/21 of the sequences
    counts = torch.bincount(zeros, minlength=21).float() / 2000
    assert torch.all((counts - 1 / 21).abs() < 0.03)
    wrapped = 0
    for row in m:
        z = (row == 0).nonzero().flatten().tolist()
        if not z:
            continue
        # one band modulo d: exactly one 1->0 transition around the circle
        trans = sum(1 for i in range(d) if row[i - 1] == 1 and row[i] == 0)
        assert trans == 1
        wrapped += row[0] == 0 and row[-1] == 0
    assert wrapped > 0  # the band may wrap from the top bin to the bottom one
    assert set(m.unique().tolist()) <= {0.0, 1.0}


def test_freq_mask_regions_keep_the_width_and_split_the_band():
    g = torch.Generator().manual_seed(1)
    m1 = spec_augment_freq_mask(500, 40, 0.5, 1, torch.Generator().manual_seed(1))
    m3 = spec_augment_freq_mask(500, 40, 0.5, 3, g)
    bands = lambda r: sum(1 for i in range(40) if r[i - 1] == 1 and r[i] == 0)
    assert max(bands(r) for r in m3) > 1 and max(bands(r) for r in m1) == 1
    assert (m3 == 0).sum(1).max() <= 20


def test_time_mask_segments_and_proportion():
    g = torch.Generator().manual_seed(0)
    z, mx = 0.2, 20
    m = spec_augment_time_mask(300, 500, z, mx, g)
    assert abs((m == 0).float().mean().item() - z) < 0.03
    nmax = int(mx * (1 - z) / z)
    starts_zero = 0
    for row in m:
        runs, cur, n = [], row[0].item(), 0
        for v in row.tolist():
            if v == cur:
                n += 1
            else:
                runs.append((cur, n))
                cur, n = v, 1
        runs.append((cur, n))
        for v, n in runs[:-1]:  # the last run may be cut by the end
            assert 1 <= n <= (mx if v == 0 else nmax)
        starts_zero += row[0] == 0
    # the first segment is zeroed with probability 1 - z
    assert abs(starts_zero / 300 - (1 - z)) < 0.08
    with pytest.raises(ValueError):
        spec_augment_time_mask(1, 10, 0.99, 1)


def test_layer_train_only_deterministic_and_masks_gradients():
    x = torch.randn(3, 100, 40, requires_grad=True)
    sa = SpecAugment(0.5, 0.2, 20, generator=torch.Generator().manual_seed(3))
    y = sa(x)
    kept = y != 0
    assert torch.equal(y[kept], x[kept]) and (~kept).any()  # no rescaling of kept values
    y.sum().backward()
    assert torch.equal(x.grad, kept.float())
    y2 = SpecAugment(0.5, 0.2, 20, generator=torch.Generator().manual_seed(3))(x)
    assert torch.equal(y, y2)
    sa.eval()
    assert sa(x) is x
    with pytest.raises(ValueError):
        SpecAugment(freq_max_proportion=1.0)


def test_tdnnf_model_with_spec_augment_same_function_in_eval():
    torch.manual_seed(0)
    kw = dict(num_pdfs=20, feat_dim=40, tdnn_dim=32, tdnnf_dim=32, bottleneck_dim=8,
              time_strides=[1, 0, 3], prefinal_dim=16, prefinal_big_dim=32, use_idct=False,
              xent_head=False)
    a = TDNNFModel(**kw)
    b = TDNNFModel(**kw, spec_augment={"freq_max_proportion": 0.5,
                                        "time_zeroed_proportion": 0.2,
                                        "time_mask_max_frames": 20})
    with torch.no_grad():
        torch.nn.init.normal_(a.component("output.affine").weight)
    x = torch.randn(2, 60, 40)
    a.train()
    a(x)  # batchnorm statistics for evaluation mode
    for c in a.components:  # b has more components (the spec-augment masks): by name
        if c.state_dict():
            b.component(c.name).load_state_dict(c.state_dict())
    a.eval(), b.eval()
    assert torch.allclose(a(x, output="output"), b(x, output="output"))
    a.train(), b.train()
    assert not torch.allclose(a(x, output="output"), b(x, output="output"))
