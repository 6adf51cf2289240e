"""What a user sees while training: the loss from the first steps, a sample grid at the end of every run."""
import os

from fastddpm.train import TrainConfig, train

TINY = dict(dataset="digits", base_channels=8, channel_mults=(1, 2), attention_resolutions=(4,), num_res_blocks=1,
            groups=4, num_timesteps=50, batch_size=8, lr=1e-3, warmup_steps=2, compile=False, ema_decay=0.9)


def test_progress_bar_shows_the_loss_from_the_first_steps(tmp_path, monkeypatch):
    from tqdm import std

    shown = []
    orig = std.tqdm.set_postfix

    def record(self, *a, **k):
        shown.append((self.n + 1, k.get("loss")))  # the step being finished (the bar advances after)
        return orig(self, *a, **k)

    monkeypatch.setattr(std.tqdm, "set_postfix", record)
    r = train(TrainConfig(out_dir=str(tmp_path / "r"), steps=6, log_every=50, progress=True, **TINY))
    early = {s: v for s, v in shown if s < 6}
    assert sorted(early) == [1, 2, 4]  # before the first log step (here the last, 6): steps 1, 2, 4
    for s, v in early.items():
        assert v == f"{r.losses[s - 1]:.4f}"  # that step's own loss


def test_a_run_shorter_than_sample_every_still_draws_a_grid(tmp_path):
    kw = dict(TINY, sample_num=2, sample_steps=2, progress=False, log_every=1)
    train(TrainConfig(out_dir=str(tmp_path / "a"), steps=3, sample_every=100, **kw))
    assert os.listdir(tmp_path / "a" / "samples") == ["step_00000003.png"]
    train(TrainConfig(out_dir=str(tmp_path / "b"), steps=4, sample_every=2, **kw))
    assert sorted(os.listdir(tmp_path / "b" / "samples")) == ["step_00000002.png", "step_00000004.png"]
    train(TrainConfig(out_dir=str(tmp_path / "c"), steps=2, sample_every=0, **kw))
    assert not (tmp_path / "c" / "samples").exists()  # sample_every=0: never
