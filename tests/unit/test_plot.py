"""rl/plot.py: a run's metrics.jsonl becomes PNG curves; a resumed step's last record wins."""
import json

from rl.plot import plot_run, read_metrics, series


def test_plots_are_written_from_metrics_and_resumed_steps_are_counted_once(tmp_path):
    rows = [{"step": 0, "eval_accuracy": 0.2, "eval/sums/accuracy": 0.2},
            *({"step": s, "accuracy": 0.1 * s, "reward_mean": 0.1 * s, "response_length": 5.0 + s,
               "logprob_mismatch_max": 1e-5, "rollout_seconds": 1.0, "train_seconds": 2.0, "sync_seconds": 0.1}
              for s in (1, 2, 3)),
            {"step": 3, "accuracy": 0.9}]  # a resumed run logging step 3 again
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = read_metrics(str(tmp_path))
    assert records[3]["accuracy"] == 0.9 and abs(records[3]["reward_mean"] - 0.3) < 1e-9  # merged, last wins
    assert series(records, "accuracy")["accuracy"] == ([1, 2, 3], [0.1, 0.2, 0.9])
    assert list(series(records, "eval/*")) == ["eval/sums/accuracy"]
    paths = plot_run(str(tmp_path))
    names = sorted(p.rsplit("/", 1)[1] for p in paths)
    assert names == ["accuracy.png", "mismatch.png", "response_length.png", "reward.png", "step_time.png"]
    assert all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in paths)
