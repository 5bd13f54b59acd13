"""Networks: builds the model a configuration's plans describe. The networks themselves know nothing of
plans; :func:`segpipe.networks.build.build_network` bridges the two.
"""
