from normlab.cli import entry

if __name__ == "__main__":  # not when multiprocessing imports it in a worker process
    entry()
