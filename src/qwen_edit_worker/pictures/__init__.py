"""Pictures in and out of a job: fetching (SSRF-guarded), decoding, sizing, encoding, uploading.

Pure of torch: `urlfetch`, `images_in`, `sizing`, `images_out`, `uploads`.
"""
