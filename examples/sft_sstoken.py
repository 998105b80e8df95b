"""SFT with ssToken token selection, written like TRL's own `trl/scripts/sft.py`.

The same flags as `trl sft` (TRL's `ScriptArguments`, `SFTConfig`, `ModelConfig`, `DatasetMixtureConfig`), with
`SSTokenConfig` in place of `SFTConfig`, so the ssToken fields (`--selection_ratio`, `--history`, ...) come on top.
Copy this file when you need to change the training loop's surroundings (callbacks, data mapping, evaluation); for
a plain run, `trl-sstoken train` does the same thing.

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

import os

from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser, get_quantization_config

from trl_sstoken import SSTokenConfig, SSTokenTrainer
from trl_sstoken.cli import peft_config_from
from trl_sstoken.loading import load_sft_datasets, load_tokenizer, pick_split


def main(script_args, training_args, model_args, dataset_args):
    # How the model is loaded (SFTTrainer loads it from the name, with these keyword arguments)
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }

    # The dataset: a hub id, a local file, or the `datasets:` mixture of the YAML config
    datasets = load_sft_datasets(
        script_args.dataset_name,
        script_args.dataset_config,
        script_args.dataset_train_split,
        script_args.dataset_streaming,
        mixture=dataset_args,
    )
    train_dataset = pick_split(datasets, script_args.dataset_train_split, "--dataset_train_split")
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = pick_split(datasets, script_args.dataset_test_split, "--dataset_test_split")

    # The trainer: SFTTrainer's arguments, selection configured by SSTokenConfig
    trainer = SSTokenTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=load_tokenizer(
            model_args.model_name_or_path, model_args.model_revision, training_args.trust_remote_code
        ),
        quantization_config=get_quantization_config(model_args),  # --load_in_4bit / --load_in_8bit
        peft_config=peft_config_from(model_args),  # --use_peft and the --lora_* flags
    )

    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    # The adapter (or the full model), the tokenizer, and a model card that records the ssToken settings
    trainer.save_model(training_args.output_dir)
    trainer.create_model_card(model_name=os.path.basename(os.path.normpath(training_args.output_dir)))
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    trainer.end()
    return trainer


def make_parser():
    return TrlParser((ScriptArguments, SSTokenConfig, ModelConfig, DatasetMixtureConfig))


if __name__ == "__main__":
    parser = make_parser()
    script_args, training_args, model_args, dataset_args = parser.parse_args_and_config()
    main(script_args, training_args, model_args, dataset_args)
