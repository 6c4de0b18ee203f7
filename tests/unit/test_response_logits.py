"""The output layer's hook: only the kept positions reach it, divided by each row's temperature."""
import torch

from rl.trainer.response_logits import ResponseLogits, labels_for, logprobs_from_loss


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.output_layer = torch.nn.Linear(4, 7, bias=False)


def test_select_keeps_positions_from_first_and_divides_by_each_rows_temperature():
    model = _Model()
    hook = ResponseLogits(model, trims=True)
    hidden = torch.randn(6, 2, 4)  # [seq, batch, hidden], as Megatron's output layer sees it
    temperature = torch.tensor([0.5, 2.0])
    assert hook.select(4, temperature) == 4
    out = model.output_layer(hidden)
    assert out.shape == (2, 2, 7)
    expected = model.output_layer.weight @ (hidden[4:] / temperature[None, :, None])[..., None]
    assert torch.allclose(out, expected.squeeze(-1), atol=1e-6)
    assert model.output_layer(hidden).shape == (6, 2, 7)  # one forward only: then a plain layer again


def test_without_trimming_every_position_is_kept():
    model = _Model()
    hook = ResponseLogits(model, trims=False)  # sequence parallel: the layer sees a slice of the sequence
    assert hook.select(4, torch.ones(2)) == 0
    assert model.output_layer(torch.randn(6, 2, 4)).shape == (6, 2, 7)


def test_labels_and_logprobs_line_up_with_next_token_targets():
    tokens = torch.tensor([[5, 6, 7, 8, 9]])
    assert labels_for(tokens, 2).tolist() == [[8, 9, 0]]  # positions 2, 3 predict 8, 9; 4 predicts nothing
    loss = torch.tensor([[0.5, 0.25, 9.0]])
    assert logprobs_from_loss(loss, 2).tolist() == [[0.0, 0.0, -0.5, -0.25]]  # width - 1, zeros before first
