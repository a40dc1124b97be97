"""The whole plugin contract: every hook a plugin may implement.

A plugin is a module (or any object) with functions decorated by
``engine.hookimpl``. Hooks are register-callbacks: the host passes a
``register`` function, the plugin calls it once per thing it adds. The host
validates each thing and records which plugin gave it; a plugin that raises
or registers something invalid is marked failed and skipped.

Hooks run at first use of the plugin host (listing generators, generating),
never at import. Keep them cheap: import torch inside your generate function,
not at module level.
"""
import pluggy

hookspec = pluggy.HookspecMarker("studio")


@hookspec
def register_generators(register):
    """Add generators.

    Called once when the plugin host loads. Call ``register(generator)`` with an
    ``engine.generators.Generator`` (its ``info`` says what it takes, makes and
    which options it has; its ``generate(request, context)`` yields
    ``Progress``/``Partial`` events and one ``Result``). A generator id must be
    unique across plugins; a duplicate is refused. Returns nothing.
    """


@hookspec
def register_architectures(register):
    """Add model families the store can recognise.

    Called once when the plugin host loads. Call ``register(architecture)`` with an
    ``engine.architectures.Architecture``: its ``matches(config)`` says whether a
    model folder's ``config.json`` is of this family, its ``generator`` says which
    generator runs it. Returns nothing.
    """


@hookspec
def register_importers(register):
    """Add ways to import models that are not studio model folders (``studio models import PATH``).

    Called once when the plugin host loads. Call ``register(importer)`` with an
    ``engine.architectures.Importer``: the store asks each importer's ``detect(path)`` in turn, and the first
    that says yes converts ``path`` into a temporary model folder (``convert(path, dest, trust)``), which is then
    checked and imported like any folder. Returns nothing.
    """


@hookspec
def register_exporters(register):
    """Add ONNX exporters for model families (``studio export-onnx``).

    Called once when the plugin host loads. Call ``register(family, export)``. The host
    (``engine.onnx_export.export_model``) calls ``export(model_ref, out_dir, options)`` with a fresh temporary
    ``out_dir`` and these ``options``:

    - ``"quantize"``: None, ``"int8"`` or ``"int4"`` (weight-only MatMuls, ``engine.backends.common.QUANTIZATIONS``);
      an exporter that quantizes returns ``"quantization"`` and gates the quantized graph against its fp32 graph
      under its own parity name (e.g. ``decoder_logits_int8``), or the host refuses the export;
    - ``"log"``: ``log(text)`` shows a progress line to the user;
    - ``"gate"``: ``gate(parity)`` judges parity figures now and raises ``engine.errors.ParityError`` when they
      fail (unless the user forced the export). Optional: call it before slow work (quantizing) to stop early;
      the host runs the gate on the returned figures itself; each named figure is judged once.

    ``export`` writes its graphs into ``out_dir`` and returns a dict: ``"graphs"`` {name: {"file", "inputs",
    "outputs"}} (non-empty), ``"parity"`` {check: {"max_abs_diff", "tolerance", "passed", ...}} (non-empty: an
    export that measured nothing is refused), and optionally ``"config"`` (what the family's runner needs),
    ``"opset"`` and ``"quantization"`` (the quantized graph's quality figures). The host checks that the files
    exist and no batch axis is frozen, writes the manifest ``onnx.json`` and renames the folder into place.
    """


@hookspec
def register_trainers(register):
    """Add training commands (``studio train KIND``).

    Called once when the plugin host loads. Call ``register(trainer)`` with an
    ``engine.generators.Trainer(kind, title, run)``: ``studio train KIND ARGS...``
    calls ``run(list_of_args)`` and exits with the int it returns; ``run`` parses
    its own arguments (so ``studio train KIND --help`` is its help) and imports
    torch itself. A kind must be unique across plugins. Returns nothing.
    """


@hookspec
def register_finetuners(register):
    """Add fine-tuning commands (``studio finetune KIND``: LoRA on an existing model).

    Called once when the plugin host loads. Call ``register(trainer)`` with an
    ``engine.generators.Trainer(kind, title, run)``, exactly as for ``register_trainers``;
    ``engine.finetune.run`` drives a family's ``engine.finetune.Task`` (checkpoints,
    resume, stop on NaN). For the GUI's fine-tune page also give ``options`` (its
    hyper-parameters as ``engine.generators.Option``; each is the command's
    ``--name-with-dashes`` flag; ``engine.finetune.lora_options`` has the shared ones),
    ``data`` ("text" or "images": what ``--data`` holds) and ``generator`` (whose models it
    fine-tunes and which applies its adapter); the page runs ``studio finetune KIND ...
    --json``. A kind must be unique across plugins. Returns nothing.
    """
