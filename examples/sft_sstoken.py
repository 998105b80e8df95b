"""SFT with ssToken token selection, as a script: it runs the package's `train` command (`trl_sstoken.cli.train`),
as TRL's `trl sft` runs `trl/scripts/sft.py`, so this script and `trl-sstoken train` are one code path.

The same flags as `trl sft` (TRL's `ScriptArguments`, `SFTConfig`, `ModelConfig`, `DatasetMixtureConfig`), with
`SSTokenConfig` in place of `SFTConfig`, so the ssToken fields (`--selection_ratio`, `--history`, ...) come on top,
plus `--tokenizer_name_or_path`. To change the training loop's surroundings (callbacks, data mapping, evaluation),
copy `main` from `trl_sstoken/cli/train.py` (load the datasets and the tokenizer, build `SSTokenTrainer`, train,
save) into your own script.

# LoRA with ssToken, one GPU (the authors' recipe: LoRA r=64, alpha=16, dropout 0.1, all linear layers, lr 1e-4)
python examples/sft_sstoken.py \
    --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
    --dataset_name trl-lib/Capybara \
    --assistant_only_loss \
    --learning_rate 1.0e-4 \
    --num_train_epochs 1 \
    --per_device_train_batch_size 6 \
    --gradient_accumulation_steps 8 \
    --use_peft \
    --lora_r 64 \
    --lora_alpha 16 \
    --lora_dropout 0.1 \
    --lora_target_modules all-linear \
    --selection_ratio 0.6 \
    --selection_gamma 0.5 \
    --history base \
    --output_dir Qwen2.5-0.5B-ssToken

# The same from a YAML file; any flag on the command line overrides the file
python examples/sft_sstoken.py --config examples/configs/sstoken_lora.yaml --selection_ratio 0.8

# Several GPUs
accelerate launch --config_file examples/accelerate/multi_gpu.yaml examples/sft_sstoken.py \
    --config examples/configs/sstoken_lora_multi_gpu.yaml

`--dataset_name` takes a hub id or a local .json, .jsonl, .csv or .parquet file. With conversational data
("messages"), pass `--assistant_only_loss` so that the user turns are the context ssToken's attention score
measures; without it every token is a label and the attention score is undefined (selection falls back to REL).
"""

from trl_sstoken.cli.train import main, make_parser


if __name__ == "__main__":
    parser = make_parser()
    main(*parser.parse_args_and_config())
