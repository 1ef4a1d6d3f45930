"""recon/rawdata"""
