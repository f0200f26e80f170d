"""Small utilities that every subject uses.

    errors          error types, exit statuses, the one formatter of an error as one line
    file_boundary   what reading a bad file raises, turned into the project's errors
    option_values   typed option values with their ranges (counts, sizes, devices, memory budgets)
    atomic          atomic writes, exclusive publishing, checksums, debris of dead processes
    dtypes          the one table of floating-point types by name
"""
