from cacheblend.eval.plots import plot_dataset, plot_ttft_vs_length, quality_metric
from cacheblend.eval.report import overview_table, write_report


def summary():
    def method(kl, ttft, f1):
        return {"n": 2, "ratio": None, "kl_first_token": kl, "top1_agreement": 1.0,
                "ttft_s": ttft, "f1": f1, "f1_vs_full": f1, "recomputed_frac": 0.1,
                "computed_frac": 0.2}

    return {"dataset": "toy", "kind": "qa", "metric": "f1", "examples": 2, "skipped": 0,
            "setting": {"passages": 2, "passage_tokens": 64, "max_tokens": 4,
                        "model": "0123456789abcdef", "store_codec": "fp16"},
            "methods": {"full": method(0.0, 3.0, 0.5), "reuse": method(0.2, 0.5, 0.3),
                        "blend": method(0.05, 1.0, 0.5)}}


SWEEP = {"lengths": [1024, 2048], "repeats": 3, "chunk_tokens": 512, "source": "synthetic",
         "skipped_peers": ["llama_cpp"],
         "methods": {"full": [{"prompt_tokens": 1030, "ttft_s": 3.0},
                              {"prompt_tokens": 2050, "ttft_s": 7.0}],
                     "blend": [{"prompt_tokens": 1030, "ttft_s": 1.0},
                               {"prompt_tokens": 2050, "ttft_s": 2.0}]}}


def test_plots_and_report(tmp_path):
    data = summary()
    assert quality_metric(data) == "f1"
    plots = plot_dataset(data, tmp_path / "runs")
    sweep_plot = plot_ttft_vs_length(SWEEP, tmp_path / "runs" / "ttft_vs_length.png")
    for path in [*plots.values(), sweep_plot]:
        assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG"
    docs = tmp_path / "docs"
    report = write_report(docs, [data], SWEEP, ["cacheblend eval --dataset toy"],
                          {"toy": plots, "ttft_sweep": {"ttft_vs_length": sweep_plot}})
    text = report.read_text()
    assert "cacheblend eval --dataset toy" in text and "| `blend` |" in text
    assert "3.00x" in text  # reuse: 3.0 s / 0.5 s... blend: 3.0 / 1.0
    assert "(results_plots/quality_vs_ttft_toy.png)" in text
    assert "(results_plots/fidelity_vs_ttft_toy.png)" in text
    assert (docs / "results_plots" / "ttft_vs_length.png").is_file()
    assert "| 2050 | 7.000 | 2.000 | 3.50x |" in text and "llama_cpp" in text
    assert "blend vs full" in text


def test_quality_plots_the_decoded_methods_else_top1():
    data = summary()
    assert quality_metric(data, against_full=True) == "f1_vs_full"
    data["methods"]["reuse"]["f1"] = None  # reuse did not decode: blend still has a score
    assert quality_metric(data) == "f1"
    data["methods"]["blend"]["f1"] = None  # only full decoded: nothing to compare
    assert quality_metric(data) == "top1_agreement"


def test_overview_averages_datasets_alike():
    one, two = summary(), summary()
    two["dataset"] = "toy2"
    two["methods"]["blend"].update(kl_first_token=0.1, ttft_s=0.5)  # 6x faster, half reuse's KL
    del two["methods"]["reuse"]["ttft_s"]
    table = overview_table([one, two])
    # blend: KL (0.05 + 0.1) / 2; share of reuse's (0.25 + 0.5) / 2; speed-up (3 + 6) / 2
    assert "| `blend` | 0.0750 | 0.38x | - | - | 1.00 | 0.500 | 4.50x | 10.0% |" in table
    assert "| `reuse` | 0.2000 | 1.00x | - | - | 1.00 | 0.300 | 6.00x | 10.0% |" in table
    for data, share, worse in ((one, 0.8, 1), (two, 0.6, 2)):
        data["methods"]["blend"].update(recovered=share, worse_than_reuse=worse, n_vs_reuse=50)
    # recovered: mean over datasets (and the worst one); worse-than-reuse: summed
    assert "| `blend` | 0.0750 | 0.38x | 70% (60%) | 3/100 |" in overview_table([one, two])
    two["methods"].pop("reuse")
    assert "`reuse`" not in overview_table([one, two])  # only methods every dataset ran


def test_selection_table_reports_recovery_against_best_reuse():
    from cacheblend.eval.report import selection_table

    data = summary()
    for label, share in (("reuse", 0.0), ("blend", 0.75)):
        data["methods"][label].update(best_reuse="reuse", recovered=share,
                                      recovered_ci=(share - 0.1, share + 0.1),
                                      worse_than_reuse=1, n_vs_reuse=2, kl_p90=0.3,
                                      kl_ci=(0.01, 0.1), top1_ci=(1.0, 1.0))
    text = selection_table(data)
    assert "best precompute mode here: `reuse`" in text
    assert "| 75% [65, 85] | 1/2 |" in text
    assert "| 3.00x |" in text  # full's TTFT over blend's


def test_the_ttft_yardstick_is_cacheblends_setting_under_any_of_its_labels():
    """HKVD@0.15:L1 in preamble mode, named with its mode since prefix became the default."""
    from cacheblend.eval.report import selection_table

    data = summary()
    hkvd = dict(data["methods"]["blend"], ttft_s=2.0)
    data["methods"]["blend[hkvd]@0.15:L1/preamble"] = hkvd
    text = selection_table(data)
    assert "TTFT / `blend[hkvd]@0.15:L1/preamble`" in text
    assert "| 1.50x |" in text  # full's TTFT (3.0) over the yardstick's (2.0), not blend's (1.0)
