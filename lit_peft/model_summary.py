"""The model summary printed when fit starts, without a FLOPs figure that was never measured.

Lightning's summary counts FLOPs only by running ``example_input_array`` through the model; a task
whose input is a batch dict (every lit-peft task) has none, so Lightning printed ``Total FLOPs: 0``
and a column of zeros. ``PeftModelSummary`` prints the same table and totals, with the FLOPs column
and total where Lightning measured them and without them where it did not. Our own rendering (with
Rich, as Lightning's ``RichModelSummary``): Lightning's ``summarize`` has no switch for the column.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichModelSummary
from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count


class PeftModelSummary(RichModelSummary):
    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int = 0,
                  **summarize_kwargs: Any) -> None:
        from rich import get_console
        from rich.table import Table

        columns = [(name, cells) for name, cells in summary_data if total_flops or name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        table.add_column(" ", style="dim")
        for name, _ in columns[1:]:  # the first column is the row number
            table.add_column(name, justify="left" if name in ("Name", "Type", "Mode") else "right")
        for row in zip(*(cells for _, cells in columns)):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        grid = Table.grid(expand=True)
        grid.add_column()
        totals = [("Trainable params", get_human_readable_count(int(trainable_parameters))),
                  ("Non-trainable params", get_human_readable_count(int(total_parameters - trainable_parameters))),
                  ("Total params", get_human_readable_count(int(total_parameters))),
                  ("Total estimated model params size (MB)", get_formatted_model_size(model_size)),
                  ("Modules in train mode", str(total_training_modes["train"])),
                  ("Modules in eval mode", str(total_training_modes["eval"]))]
        if total_flops:
            totals.append(("Total FLOPs", get_human_readable_count(int(total_flops))))
        for name, value in totals:
            grid.add_row(f"[bold]{name}[/]: {value}")
        console.print(grid)
