import torch

from kvformer import BatchNorm, LayerNorm, RMSNorm


def test_layernorm_matches_torch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g)
    ours = LayerNorm(16, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(16, generator=g))
        ours.bias.copy_(torch.randn(16, generator=g))
    ref = torch.nn.functional.layer_norm(x, (16,), ours.weight, ours.bias, 1e-5)
    torch.testing.assert_close(ours(x), ref, atol=1e-5, rtol=1e-5)


def test_layernorm_is_per_sample():
    # Changing one sample never changes another's output (unlike BatchNorm in training).
    x = torch.randn(4, 8)
    y = x.clone()
    y[0] *= 100
    assert torch.equal(LayerNorm(8)(x)[1:], LayerNorm(8)(y)[1:])


def test_rmsnorm_hand_computed():
    x = torch.tensor([[3.0, 4.0]])
    rms = (12.5) ** 0.5  # sqrt((9 + 16) / 2)
    torch.testing.assert_close(RMSNorm(2, eps=0.0)(x), x / rms)
    n = RMSNorm(16, eps=1e-6)
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(n(x), torch.nn.functional.rms_norm(x, (16,), n.weight, 1e-6))


def test_batchnorm_matches_torch_train_and_eval():
    g = torch.Generator().manual_seed(0)
    ours = BatchNorm(6, eps=1e-5, momentum=0.1)
    ref = torch.nn.BatchNorm1d(6, eps=1e-5, momentum=0.1)
    for _ in range(3):
        x = torch.randn(4, 7, 6, generator=g) * 3 + 1
        # torch's BatchNorm1d wants (N, C, L): per feature over batch x time
        torch.testing.assert_close(ours(x), ref(x.transpose(1, 2)).transpose(1, 2),
                                   atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    ours.eval()
    ref.eval()
    x = torch.randn(2, 3, 6, generator=g)
    torch.testing.assert_close(ours(x), ref(x.transpose(1, 2)).transpose(1, 2),
                               atol=1e-5, rtol=1e-5)


def test_batchnorm_statistics_are_per_feature_across_the_batch():
    x = torch.tensor([[[1.0, 10.0]], [[3.0, 30.0]]])  # 2 samples, 1 step, 2 features
    y = BatchNorm(2, eps=0.0)(x)
    # feature 0: mean 2, std 1; feature 1: mean 20, std 10
    torch.testing.assert_close(y, torch.tensor([[[-1.0, -1.0]], [[1.0, 1.0]]]))
