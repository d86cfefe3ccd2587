"""``actadd compare``: steered and unsteered completions side by side."""

from __future__ import annotations

from typing import Annotated

import typer

from actadd.cli.common import (
    AddOpt,
    ChatOpt,
    FreqPenaltyOpt,
    LocationOpt,
    ModelOpt,
    PadOpt,
    SeedOpt,
    SiteOpt,
    TemperatureOpt,
    TokensOpt,
    TopPOpt,
    check_location,
    check_site,
    console,
    fail,
    load,
    progress,
)


def compare(
    prompt: Annotated[str, typer.Option(help="the prompt to complete")] = "I hate you because",
    add: AddOpt = "Love",
    sub: Annotated[
        str,
        typer.Option(
            help="prompt whose activations are subtracted; '' subtracts nothing (a single "
            "addition), or with --pad the other prompt's length of spaces"
        ),
    ] = "Hate",
    layer: Annotated[int, typer.Option(help="layer (blocks.L.hook_resid_pre)")] = 6,
    site: SiteOpt = "resid_pre",
    coeff: Annotated[
        float | None, typer.Option(help="coefficient (default 5; with --vector, the file's)")
    ] = None,
    n: Annotated[int, typer.Option("--n", help="number of comparisons")] = 3,
    seed: SeedOpt = 0,
    tokens: TokensOpt = 40,
    temperature: TemperatureOpt = 1.0,
    top_p: TopPOpt = 0.3,
    top_k: Annotated[int, typer.Option(help="top-k sampling (0: off)")] = 0,
    freq_penalty: FreqPenaltyOpt = 1.0,
    location: LocationOpt = None,
    pad: PadOpt = False,
    chat: ChatOpt = False,
    vector: Annotated[
        str | None, typer.Option(help="steer with this vector file (.safetensors/.gguf) instead")
    ] = None,
    model: ModelOpt = None,
) -> None:
    """Steered and unsteered completions side by side."""
    import actadd
    from actadd.display import comparison_rich_table
    from actadd.generation import comparison_table

    try:
        where = check_location(location)
        act_name = actadd.get_act_name(check_site(site), layer)
        lm = load(model)
        adds: list[actadd.steering.Steerable]
        if vector is not None:
            v = actadd.SteeringVector.read(vector, lm)
            v = v if coeff is None else v.with_coeff(coeff)
            adds, coeff = [v], v.coeff
            act_name, what = ", ".join(v.sites), f"({str(v.meta.get('method', vector))!r})"
        else:
            coeff = 5.0 if coeff is None else coeff
            if sub == "" and not pad:
                adds = [actadd.ActivationAddition(coeff, act_name, prompt=add)]
                what = repr(add)
            else:
                space = lm.to_single_token(" ") if pad else None
                method = "tokens_right" if pad else None
                adds = list(actadd.get_x_vector(add, sub, coeff, act_name, lm, method, space))
                what = f"({add!r} − {sub!r})"
        with progress():
            df = actadd.compare(
                prompt,
                lm,
                tokens,
                adds,
                n,
                seed,
                temperature,
                freq_penalty,
                top_p,
                top_k=top_k,
                addition_location=where,
                chat=chat,
            )
    except actadd.ActAddError as e:
        raise fail(e) from e
    shown = where or ("all" if vector else "front")
    if chat:
        shown += " of the user's message"
    title = f"{prompt}…  steering: {coeff:g} × {what} at {act_name}, {shown}"
    console.print(comparison_rich_table(comparison_table(df), title))
