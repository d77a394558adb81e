from gptft.cli import run

run()
