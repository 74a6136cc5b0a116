"""Machine-generated instruction data, as the seed papers made theirs, on the project's own jitted models.

    python -m genllava_jax.datagen llava --llm=ckpt/mistral-instruct --tokenizer=Mistral-7B-Instruct-v0.2 \
        --captions=captions_train2017.json --instances=instances_train2017.json --images=coco/train2017 \
        --out=coco/llava_gen.jsonl
    python -m genllava_jax.datagen brainstorm --llm=... --n=5000 --out=topics.txt
    python -m genllava_jax.datagen stablellava --llm=... --topics=topics.txt --sd=ckpt/sd \
        --clip=clip-vit-large-patch14 --out=stablellava/records.jsonl
    python -m genllava_jax.datagen edit --kind=edit --src=instructpix2pix/ --out=ip2p/edit.jsonl
    python -m genllava_jax.datagen edit --kind=t2i --src=captions_train2017.json --images=coco/train2017 \
        --out=coco/t2i.jsonl

Modules: `coco` (annotations -> captions + boxes context), `prompts` (the editable prompt files under
configs/datagen/), `llm` (the chat LLM and its batched jitted decode), `replies` (parsers and filters, each
rejection with a reason), `output` (resumable sharded JSONL, counts, ArrayRecord), the makers `llava`,
`stablellava` and `edit`, and `demo` (`make datagen-demo`).

Every command writes GVIT records (images relative to the output file, `<image>` in the first user turn) to one
shard per process (--shard/--num_shards, by default the JAX process index and count: each host of a pod its own),
appends as it goes and skips ids already written when rerun; each filtered record goes with its reason and the
LLM's text to the `.rejected.jsonl` beside it, and `.report.json` counts kept and filtered-by-reason records.
"""
