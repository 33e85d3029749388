"""Data sets: built-in (digits, MQAR), user folders and arrays, splits and batching; ``load_task_data`` maps a
space file's ``task`` section to tensors in memory."""
