from gsd_wsi.cli.main import app

app(prog_name="gsd-wsi")
